/* Compiled inner loops of function recovery (earmark.extract.disasm, .functions and
 * .function_features): the decode loop of InstructionDecoder._decode_window, the straight-line
 * walk of FunctionRecovery.explore and the per-instruction pass of build_features.
 *
 * Why C: decoding is ~60 % of function recovery in pure Python, and almost all of that is
 * per-instruction interpreter work around capstone (the ctypes generator of disasm_lite,
 * bytes.decode of two fields, a tuple key, an 8-field unpack, a 10-field tuple). Here the
 * same loop runs over capstone's output array directly: measured ~5x less time per decoded
 * instruction on corpus DLLs. What an instruction *means* (operand classes, targets,
 * immediates) is still decided by the Python ``_analyse``, called for each instruction text
 * not seen before, so there is one implementation of the normalisation; the one exception is
 * a direct branch to a new target ("call 0x401000"), built here from the Python answer for
 * its mnemonic, because such texts are a third of all cache misses.
 *
 * Capstone is not linked at build time: the Python side hands over the addresses of
 * cs_disasm/cs_free/cs_errno from the library the capstone package already loaded, and the
 * layout of cs_insn as that package's ctypes structure declares it. The build therefore needs
 * only a C compiler and the Python headers, and always matches the installed capstone.
 *
 * The pure-Python loop stays the reference: tests run both and compare every feature.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef size_t (*cs_disasm_fn)(size_t handle, const uint8_t *code, size_t code_size,
                               uint64_t address, size_t count, void **insn);
typedef void (*cs_free_fn)(void *insn, size_t count);
typedef int (*cs_errno_fn)(size_t handle);

static cs_disasm_fn disasm_function = NULL;
static cs_free_fn free_function = NULL;
static cs_errno_fn errno_function = NULL;
static Py_ssize_t insn_bytes = 0; /* sizeof(cs_insn) */
static Py_ssize_t address_offset = 0, size_offset = 0, mnemonic_offset = 0, op_str_offset = 0;
static Py_ssize_t mnemonic_capacity = 0, op_str_capacity = 0;

#define ANALYSIS_FIELDS 8
#define INSTRUCTION_FIELDS 10

static PyObject *
configure(PyObject *module, PyObject *args)
{
    unsigned long long disasm_address, free_address, errno_address;
    if (!PyArg_ParseTuple(args, "KKKnnnnnnn", &disasm_address, &free_address, &errno_address,
                          &insn_bytes, &address_offset, &size_offset, &mnemonic_offset,
                          &mnemonic_capacity, &op_str_offset, &op_str_capacity)) {
        return NULL;
    }
    if (!disasm_address || !free_address || !errno_address || insn_bytes <= 0) {
        PyErr_SetString(PyExc_ValueError, "capstone entry points or cs_insn layout missing");
        return NULL;
    }
    disasm_function = (cs_disasm_fn)(uintptr_t)disasm_address;
    free_function = (cs_free_fn)(uintptr_t)free_address;
    errno_function = (cs_errno_fn)(uintptr_t)errno_address;
    Py_RETURN_NONE;
}

/* A NUL-terminated ASCII field of cs_insn as str (capstone writes ASCII only; a non-ASCII byte
 * raises UnicodeDecodeError, as bytes.decode("ascii") does on the Python path). */
static PyObject *
text_field(const char *field, Py_ssize_t capacity)
{
    const char *end = memchr(field, 0, (size_t)capacity);
    Py_ssize_t length = end ? (Py_ssize_t)(end - field) : capacity;
    return PyUnicode_DecodeASCII(field, length, "strict");
}

/* (address + size + displacement) mod 2**64, the RIP-relative operand's address. */
static PyObject *
rip_address(uint64_t address, unsigned size, PyObject *displacement)
{
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(displacement, &overflow);
    if (value == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!overflow) {
        return PyLong_FromUnsignedLongLong(address + size + (uint64_t)value);
    }
    /* Wider than 64 bits: Python integers, then the mask, as the Python path does. */
    PyObject *result = NULL, *sum = NULL, *mask = NULL;
    PyObject *next = PyLong_FromUnsignedLongLong(address + size);
    if (next == NULL) {
        return NULL;
    }
    sum = PyNumber_Add(next, displacement);
    mask = PyLong_FromUnsignedLongLong(UINT64_MAX);
    if (sum != NULL && mask != NULL) {
        result = PyNumber_And(sum, mask);
    }
    Py_DECREF(next);
    Py_XDECREF(sum);
    Py_XDECREF(mask);
    return result;
}

/* Per-sample memo: instruction text (mnemonic and operands as capstone wrote them) -> the
 * op_str object and the analysis already found for it. A hit costs a hash over the text and
 * one compare, instead of two new str objects, a key tuple and up to two dict lookups with
 * fresh string hashes (measured ~half of the loop's own time per instruction). The memo lives
 * as long as its InstructionDecoder (one sample), so a text always maps to the same answer. */
#define MEMO_CAPSULE "earmark.extract._native.memo"

typedef struct {
    uint64_t hash;
    char *text; /* mnemonic, NUL, op_str; NULL for an empty slot */
    size_t mnemonic_length, op_str_length;
    PyObject *op_str, *analysis;
} MemoEntry;

typedef struct {
    MemoEntry *entries;
    size_t capacity; /* a power of two */
    size_t used;
} Memo;

static void
memo_free(PyObject *capsule)
{
    Memo *memo = PyCapsule_GetPointer(capsule, MEMO_CAPSULE);
    if (memo == NULL) {
        PyErr_Clear();
        return;
    }
    for (size_t i = 0; i < memo->capacity; i++) {
        MemoEntry *entry = &memo->entries[i];
        if (entry->text != NULL) {
            PyMem_Free(entry->text);
            Py_DECREF(entry->op_str);
            Py_DECREF(entry->analysis);
        }
    }
    PyMem_Free(memo->entries);
    PyMem_Free(memo);
}

static PyObject *
new_memo(PyObject *module, PyObject *unused)
{
    Memo *memo = PyMem_Calloc(1, sizeof(Memo));
    if (memo == NULL) {
        return PyErr_NoMemory();
    }
    memo->capacity = 1024;
    memo->entries = PyMem_Calloc(memo->capacity, sizeof(MemoEntry));
    if (memo->entries == NULL) {
        PyMem_Free(memo);
        return PyErr_NoMemory();
    }
    PyObject *capsule = PyCapsule_New(memo, MEMO_CAPSULE, memo_free);
    if (capsule == NULL) {
        PyMem_Free(memo->entries);
        PyMem_Free(memo);
    }
    return capsule;
}

static uint64_t
text_hash(const char *mnemonic, size_t mnemonic_length, const char *op_str, size_t op_str_length)
{
    uint64_t hash = 0xcbf29ce484222325ULL; /* FNV-1a */
    for (size_t i = 0; i < mnemonic_length; i++) {
        hash = (hash ^ (unsigned char)mnemonic[i]) * 0x100000001b3ULL;
    }
    hash = (hash ^ 0xff) * 0x100000001b3ULL; /* separator: no ASCII text holds 0xff */
    for (size_t i = 0; i < op_str_length; i++) {
        hash = (hash ^ (unsigned char)op_str[i]) * 0x100000001b3ULL;
    }
    return hash;
}

/* The slot holding this text, or the empty slot where it would go. */
static MemoEntry *
memo_slot(Memo *memo, uint64_t hash, const char *mnemonic, size_t mnemonic_length,
          const char *op_str, size_t op_str_length)
{
    size_t mask = memo->capacity - 1;
    for (size_t i = (size_t)hash & mask;; i = (i + 1) & mask) {
        MemoEntry *entry = &memo->entries[i];
        if (entry->text == NULL) {
            return entry;
        }
        if (entry->hash == hash && entry->mnemonic_length == mnemonic_length &&
            entry->op_str_length == op_str_length &&
            memcmp(entry->text, mnemonic, mnemonic_length) == 0 &&
            memcmp(entry->text + mnemonic_length + 1, op_str, op_str_length) == 0) {
            return entry;
        }
    }
}

/* Remembers (op_str, analysis) for a text; 0, or -1 with MemoryError. */
static int
memo_add(Memo *memo, uint64_t hash, const char *mnemonic, size_t mnemonic_length,
         const char *op_str, size_t op_str_length, PyObject *op_str_object, PyObject *analysis)
{
    if (2 * (memo->used + 1) > memo->capacity) { /* keep the table at most half full */
        size_t capacity = memo->capacity * 2;
        MemoEntry *entries = PyMem_Calloc(capacity, sizeof(MemoEntry));
        if (entries == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (size_t i = 0; i < memo->capacity; i++) {
            if (memo->entries[i].text != NULL) {
                size_t j = (size_t)memo->entries[i].hash & (capacity - 1);
                while (entries[j].text != NULL) {
                    j = (j + 1) & (capacity - 1);
                }
                entries[j] = memo->entries[i];
            }
        }
        PyMem_Free(memo->entries);
        memo->entries = entries;
        memo->capacity = capacity;
    }
    MemoEntry *entry = memo_slot(memo, hash, mnemonic, mnemonic_length, op_str, op_str_length);
    if (entry->text != NULL) {
        return 0; /* already there */
    }
    char *text = PyMem_Malloc(mnemonic_length + op_str_length + 2);
    if (text == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(text, mnemonic, mnemonic_length);
    text[mnemonic_length] = 0;
    memcpy(text + mnemonic_length + 1, op_str, op_str_length);
    text[mnemonic_length + 1 + op_str_length] = 0;
    entry->hash = hash;
    entry->text = text;
    entry->mnemonic_length = mnemonic_length;
    entry->op_str_length = op_str_length;
    Py_INCREF(op_str_object);
    Py_INCREF(analysis);
    entry->op_str = op_str_object;
    entry->analysis = analysis;
    memo->used++;
    return 0;
}

/* The target of a direct branch whose operand text is "0x" and 1-16 hex digits, masked to the
 * image's address width; -1 for any other text (left to the Python analysis). */
static int
direct_target(const char *text, uint64_t mask, uint64_t *target)
{
    if (text[0] != '0' || text[1] != 'x' || text[2] == 0) {
        return -1;
    }
    uint64_t value = 0;
    int digits = 0;
    for (const char *c = text + 2; *c; c++, digits++) {
        int digit;
        if (*c >= '0' && *c <= '9') {
            digit = *c - '0';
        } else if (*c >= 'a' && *c <= 'f') {
            digit = *c - 'a' + 10;
        } else if (*c >= 'A' && *c <= 'F') {
            digit = *c - 'A' + 10;
        } else {
            return -1;
        }
        if (digits == 16) {
            return -1;
        }
        value = (value << 4) | (uint64_t)digit;
    }
    *target = value & mask;
    return 0;
}

/* decode_window(handle, data, offset, length, address, decoded, shared, local, analyse,
 *               branches, address_mask, kind, memo)
 *
 * Decodes data[offset:offset+length] at ``address`` and stores one ``kind`` tuple (the
 * Instruction NamedTuple) per instruction in ``decoded``, stopping at the first instruction
 * other than the first that ``decoded`` already holds. An instruction text's analysis is looked
 * up in ``shared`` and then ``local`` (both keyed by (mnemonic, op_str)); a direct branch to a
 * new target whose mnemonic is in ``branches`` (mnemonic text -> (mnemonic, token, kind)) is
 * built here; any other new text goes to analyse(mnemonic, op_str), which caches it. Every
 * answer but a direct branch's is also kept in ``memo`` (new_memo), checked first. */
static PyObject *
decode_window(PyObject *module, PyObject *args)
{
    unsigned long long handle, address_mask;
    Py_buffer data;
    Py_ssize_t offset, length;
    PyObject *start_object, *decoded, *shared, *local, *analyse, *branches, *memo_capsule;
    PyTypeObject *kind;
    if (!PyArg_ParseTuple(args, "Ky*nnOO!O!O!OO!KO!O", &handle, &data, &offset, &length,
                          &start_object, &PyDict_Type, &decoded, &PyDict_Type, &shared,
                          &PyDict_Type, &local, &analyse, &PyDict_Type, &branches,
                          &address_mask, &PyType_Type, &kind, &memo_capsule)) {
        return NULL;
    }
    Memo *memo = PyCapsule_GetPointer(memo_capsule, MEMO_CAPSULE);
    if (memo == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if (disasm_function == NULL) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_RuntimeError, "earmark.extract._native.configure was not called");
        return NULL;
    }
    if (!PyType_IsSubtype(kind, &PyTuple_Type)) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_TypeError, "the instruction type must be a tuple subclass");
        return NULL;
    }
    uint64_t start = PyLong_AsUnsignedLongLong(start_object);
    if (start == (uint64_t)-1 && PyErr_Occurred()) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if (offset < 0 || offset > data.len) {
        offset = data.len;
    }
    if (length < 0 || length > data.len - offset) {
        length = data.len - offset;
    }
    void *instructions = NULL;
    size_t count = disasm_function((size_t)handle, (const uint8_t *)data.buf + offset,
                                   (size_t)length, start, 0, &instructions);
    PyBuffer_Release(&data);
    if (count == 0) {
        int status = errno_function((size_t)handle);
        if (status != 0) { /* CS_ERR_OK; disasm_lite raises CsError here */
            PyErr_Format(PyExc_RuntimeError, "capstone error %d", status);
            return NULL;
        }
        Py_RETURN_NONE;
    }
    PyObject *no_values = PyTuple_New(0);
    if (no_values == NULL) {
        free_function(instructions, count);
        return NULL;
    }
    for (size_t i = 0; i < count; i++) {
        const char *insn = (const char *)instructions + (Py_ssize_t)i * insn_bytes;
        uint64_t insn_address;
        uint16_t insn_size;
        memcpy(&insn_address, insn + address_offset, sizeof insn_address);
        memcpy(&insn_size, insn + size_offset, sizeof insn_size);
        PyObject *address = PyLong_FromUnsignedLongLong(insn_address);
        if (address == NULL) {
            break;
        }
        if (insn_address != start) {
            int present = PyDict_Contains(decoded, address);
            if (present != 0) {
                Py_DECREF(address);
                break; /* in sync with what is cached (or an error, raised below) */
            }
        }
        const char *mnemonic_text = insn + mnemonic_offset;
        const char *op_str_text = insn + op_str_offset;
        size_t mnemonic_length = strnlen(mnemonic_text, (size_t)mnemonic_capacity);
        size_t op_str_length = strnlen(op_str_text, (size_t)op_str_capacity);
        uint64_t hash = text_hash(mnemonic_text, mnemonic_length, op_str_text, op_str_length);
        MemoEntry *remembered = memo_slot(memo, hash, mnemonic_text, mnemonic_length,
                                          op_str_text, op_str_length);
        PyObject *mnemonic = NULL, *op_str = NULL, *key = NULL;
        /* (mnemonic, token, kind, target, absolute memory, rip displacement, address
         * immediates, large immediates), as _OperandAnalysis lists them; all owned. */
        PyObject *fields[ANALYSIS_FIELDS] = {NULL};
        PyObject *analysis = NULL;
        int ready = 0;
        if (remembered->text != NULL) {
            op_str = remembered->op_str;
            analysis = remembered->analysis;
            Py_INCREF(op_str);
            Py_INCREF(analysis);
        } else {
            mnemonic = text_field(mnemonic_text, mnemonic_capacity);
            /* Interned: the cache keys keep it, and a few hundred mnemonics spell ~70k texts. */
            if (mnemonic != NULL) {
                PyUnicode_InternInPlace(&mnemonic);
            }
            op_str = mnemonic ? text_field(op_str_text, op_str_capacity) : NULL;
            key = op_str ? PyTuple_Pack(2, mnemonic, op_str) : NULL;
        }
        if (key != NULL) {
            analysis = PyDict_GetItemWithError(shared, key); /* borrowed */
            if (analysis == NULL && !PyErr_Occurred()) {
                analysis = PyDict_GetItemWithError(local, key);
            }
            Py_XINCREF(analysis);
        }
        if (key != NULL && analysis == NULL && !PyErr_Occurred()) {
            PyObject *branch = PyDict_GetItemWithError(branches, mnemonic); /* borrowed */
            uint64_t target;
            if (branch != NULL && PyTuple_Check(branch) && PyTuple_GET_SIZE(branch) == 3 &&
                direct_target(insn + op_str_offset, address_mask, &target) == 0) {
                fields[3] = PyLong_FromUnsignedLongLong(target);
                if (fields[3] != NULL) {
                    for (int f = 0; f < 3; f++) {
                        fields[f] = PyTuple_GET_ITEM(branch, f);
                        Py_INCREF(fields[f]);
                    }
                    fields[4] = Py_None;
                    fields[5] = Py_None;
                    fields[6] = no_values;
                    fields[7] = no_values;
                    for (int f = 4; f < ANALYSIS_FIELDS; f++) {
                        Py_INCREF(fields[f]);
                    }
                    ready = 1;
                }
            } else if (!PyErr_Occurred()) {
                analysis = PyObject_CallObject(analyse, key);
            }
        }
        if (key != NULL && analysis != NULL &&
            memo_add(memo, hash, mnemonic_text, mnemonic_length, op_str_text, op_str_length,
                     op_str, analysis) < 0) {
            Py_CLEAR(analysis);
        }
        Py_XDECREF(key);
        Py_XDECREF(mnemonic);
        if (analysis != NULL) {
            if (PyTuple_Check(analysis) && PyTuple_GET_SIZE(analysis) == ANALYSIS_FIELDS) {
                for (int f = 0; f < ANALYSIS_FIELDS; f++) {
                    fields[f] = PyTuple_GET_ITEM(analysis, f);
                    Py_INCREF(fields[f]);
                }
                ready = 1;
            } else {
                PyErr_SetString(PyExc_TypeError, "analyse must return an 8-field tuple");
            }
            Py_DECREF(analysis);
        }
        PyObject *memory = NULL, *size = NULL, *instruction = NULL;
        if (ready) {
            if (fields[5] != Py_None) {
                memory = rip_address(insn_address, insn_size, fields[5]);
            } else {
                memory = fields[4];
                Py_INCREF(memory);
            }
            size = memory ? PyLong_FromLong(insn_size) : NULL;
            instruction = size ? kind->tp_alloc(kind, INSTRUCTION_FIELDS) : NULL;
        }
        if (instruction != NULL) {
            PyObject *values[INSTRUCTION_FIELDS] = {
                address, size, fields[0], op_str, fields[1], fields[2], fields[3], memory,
                fields[6], fields[7],
            };
            for (Py_ssize_t field = 0; field < INSTRUCTION_FIELDS; field++) {
                Py_INCREF(values[field]);
                PyTuple_SET_ITEM(instruction, field, values[field]);
            }
            if (PyDict_SetItem(decoded, address, instruction) < 0) {
                Py_CLEAR(instruction);
            }
        }
        int stored = instruction != NULL;
        Py_XDECREF(instruction);
        Py_DECREF(address);
        Py_XDECREF(op_str);
        Py_XDECREF(memory);
        Py_XDECREF(size);
        for (int f = 0; f < ANALYSIS_FIELDS; f++) {
            Py_XDECREF(fields[f]);
        }
        if (!stored) {
            break;
        }
    }
    Py_DECREF(no_values);
    free_function(instructions, count);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Fields of the Instruction NamedTuple (earmark.extract.disasm.Instruction). */
enum {
    FIELD_ADDRESS = 0,
    FIELD_SIZE = 1,
    FIELD_MNEMONIC = 2,
    FIELD_OP_STR = 3,
    FIELD_KIND = 5,
    FIELD_MEMORY = 7,
    FIELD_ADDRESS_IMMEDIATES = 8,
    FIELD_LARGE_IMMEDIATES = 9,
};
#define KIND_PLAIN 0
#define KIND_CALL 3

/* Index of the first ", " in ``text``, or its length: the first operand of an instruction. */
static PyObject *
first_operand(PyObject *op_str)
{
    Py_ssize_t length = PyUnicode_GET_LENGTH(op_str);
    Py_ssize_t found = -1;
    for (Py_ssize_t i = 0; i + 1 < length; i++) {
        if (PyUnicode_READ_CHAR(op_str, i) == ',' && PyUnicode_READ_CHAR(op_str, i + 1) == ' ') {
            found = i;
            break;
        }
    }
    if (found < 0) {
        Py_INCREF(op_str);
        return op_str;
    }
    return PyUnicode_Substring(op_str, 0, found);
}

/* walk_plain(address, start, instructions, known, decoded, max_instructions, trail,
 *            import_slots, import_registers) -> address
 *
 * The straight-line part of FunctionRecovery.explore: from ``address``, takes every already
 * decoded KIND_PLAIN instruction into ``instructions`` and ``trail`` (noting ``mov reg,
 * [IAT slot]`` in ``import_registers``) and returns the first address the Python loop must look
 * at itself: one already in the function or in another known function, the instruction limit,
 * an address not decoded yet, or any instruction that is not plain. Measured: plain
 * instructions are ~3/4 of all, and this loop was the largest Python cost of descent. */
static PyObject *
walk_plain(PyObject *module, PyObject *args)
{
    PyObject *address, *start, *instructions, *known, *decoded, *trail, *import_slots;
    PyObject *import_registers;
    Py_ssize_t max_instructions;
    if (!PyArg_ParseTuple(args, "OOO!O!O!nO!O!O!", &address, &start, &PyDict_Type,
                          &instructions, &PyDict_Type, &known, &PyDict_Type, &decoded,
                          &max_instructions, &PyList_Type, &trail, &PyDict_Type, &import_slots,
                          &PyDict_Type, &import_registers)) {
        return NULL;
    }
    Py_INCREF(address);
    for (;;) {
        int seen = PyDict_Contains(instructions, address);
        if (seen != 0) {
            break;
        }
        int is_start = PyObject_RichCompareBool(address, start, Py_EQ);
        if (is_start < 0) {
            break;
        }
        if (!is_start) {
            int other = PyDict_Contains(known, address);
            if (other != 0) {
                break;
            }
        }
        if (PyDict_GET_SIZE(instructions) >= max_instructions) {
            break;
        }
        PyObject *instruction = PyDict_GetItemWithError(decoded, address); /* borrowed */
        if (instruction == NULL || !PyTuple_Check(instruction) ||
            PyTuple_GET_SIZE(instruction) <= FIELD_LARGE_IMMEDIATES) {
            break; /* not decoded yet, invalid bytes (None), or an error raised below */
        }
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(instruction, FIELD_KIND));
        if (kind != KIND_PLAIN) {
            break; /* also -1 with an error set */
        }
        if (PyDict_SetItem(instructions, address, instruction) < 0 ||
            PyList_Append(trail, instruction) < 0) {
            break;
        }
        PyObject *memory = PyTuple_GET_ITEM(instruction, FIELD_MEMORY);
        if (memory != Py_None &&
            PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(instruction, FIELD_MNEMONIC),
                                             "mov") == 0) {
            PyObject *name = PyDict_GetItemWithError(import_slots, memory); /* borrowed */
            if (name != NULL && name != Py_None) {
                PyObject *reg = first_operand(PyTuple_GET_ITEM(instruction, FIELD_OP_STR));
                int stored = reg ? PyDict_SetItem(import_registers, reg, name) : -1;
                Py_XDECREF(reg);
                if (stored < 0) {
                    break;
                }
            } else if (PyErr_Occurred()) {
                break;
            }
        }
        PyObject *following = PyNumber_Add(address, PyTuple_GET_ITEM(instruction, FIELD_SIZE));
        if (following == NULL) {
            break;
        }
        Py_SETREF(address, following);
    }
    if (PyErr_Occurred()) {
        Py_DECREF(address);
        return NULL;
    }
    return address;
}

/* describe_body(ordered, instructions, leaders, successors, start)
 *     -> (end, edge_count, references, large_immediates)
 *
 * The per-instruction pass of function_features.build_features over one function's
 * instructions in address order: the end of the last instruction (at least ``start``), the
 * CFG edge count, the addresses the code references (address immediates, then a plain
 * instruction's fixed memory operand) and all large immediates, each in instruction order. */
static PyObject *
describe_body(PyObject *module, PyObject *args)
{
    PyObject *ordered, *instructions, *leaders, *successors_of, *start;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O", &PyList_Type, &ordered, &PyDict_Type,
                          &instructions, &PySet_Type, &leaders, &PyDict_Type, &successors_of,
                          &start)) {
        return NULL;
    }
    PyObject *references = PyList_New(0);
    PyObject *large = PyList_New(0);
    PyObject *end = start;
    Py_INCREF(end);
    Py_ssize_t edges = 0;
    int failed = references == NULL || large == NULL;
    for (Py_ssize_t i = 0; !failed && i < PyList_GET_SIZE(ordered); i++) {
        PyObject *instruction = PyList_GET_ITEM(ordered, i);
        if (!PyTuple_Check(instruction) ||
            PyTuple_GET_SIZE(instruction) <= FIELD_LARGE_IMMEDIATES) {
            PyErr_SetString(PyExc_TypeError, "expected Instruction tuples");
            failed = 1;
            break;
        }
        PyObject *address = PyTuple_GET_ITEM(instruction, FIELD_ADDRESS);
        PyObject *following = PyNumber_Add(address, PyTuple_GET_ITEM(instruction, FIELD_SIZE));
        if (following == NULL) {
            failed = 1;
            break;
        }
        int later = PyObject_RichCompareBool(following, end, Py_GT);
        if (later > 0) {
            Py_INCREF(following);
            Py_SETREF(end, following);
        }
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(instruction, FIELD_KIND));
        PyObject *successors = later < 0 || (kind == -1 && PyErr_Occurred())
                                   ? NULL
                                   : PyDict_GetItemWithError(successors_of, address);
        if (PyErr_Occurred()) {
            Py_DECREF(following);
            failed = 1;
            break;
        }
        if (successors != NULL) {
            PyObject *iterator = PyObject_GetIter(successors);
            PyObject *successor;
            while (iterator != NULL && (successor = PyIter_Next(iterator)) != NULL) {
                int inside = PyDict_Contains(instructions, successor);
                Py_DECREF(successor);
                if (inside < 0) {
                    break;
                }
                edges += inside;
            }
            Py_XDECREF(iterator);
        } else if (kind == KIND_PLAIN || kind == KIND_CALL) {
            int leader = PySet_Contains(leaders, following);
            int inside = leader > 0 ? PyDict_Contains(instructions, following) : 0;
            edges += leader > 0 && inside > 0;
        }
        Py_DECREF(following);
        if (PyErr_Occurred()) {
            failed = 1;
            break;
        }
        PyObject *immediates = PyTuple_GET_ITEM(instruction, FIELD_ADDRESS_IMMEDIATES);
        PyObject *memory = PyTuple_GET_ITEM(instruction, FIELD_MEMORY);
        PyObject *values = PyTuple_GET_ITEM(instruction, FIELD_LARGE_IMMEDIATES);
        if (!PyTuple_Check(immediates) || !PyTuple_Check(values)) {
            PyErr_SetString(PyExc_TypeError, "expected tuples of immediates");
            failed = 1;
            break;
        }
        for (Py_ssize_t j = 0; !failed && j < PyTuple_GET_SIZE(immediates); j++) {
            failed = PyList_Append(references, PyTuple_GET_ITEM(immediates, j)) < 0;
        }
        if (!failed && memory != Py_None && kind == KIND_PLAIN) {
            failed = PyList_Append(references, memory) < 0;
        }
        for (Py_ssize_t j = 0; !failed && j < PyTuple_GET_SIZE(values); j++) {
            failed = PyList_Append(large, PyTuple_GET_ITEM(values, j)) < 0;
        }
    }
    PyObject *result = NULL;
    if (!failed) {
        result = Py_BuildValue("(OnOO)", end, edges, references, large);
    }
    Py_DECREF(end);
    Py_XDECREF(references);
    Py_XDECREF(large);
    return result;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(cs_disasm, cs_free, cs_errno, insn_size, address_offset, size_offset, "
     "mnemonic_offset, mnemonic_size, op_str_offset, op_str_size)"},
    {"decode_window", decode_window, METH_VARARGS,
     "decode_window(handle, data, offset, length, address, decoded, shared, local, analyse, "
     "branches, address_mask, kind, memo)"},
    {"new_memo", new_memo, METH_NOARGS, "new_memo() -> a per-sample memo for decode_window"},
    {"walk_plain", walk_plain, METH_VARARGS,
     "walk_plain(address, start, instructions, known, decoded, max_instructions, trail, "
     "import_slots, import_registers) -> address"},
    {"describe_body", describe_body, METH_VARARGS,
     "describe_body(ordered, instructions, leaders, successors, start) -> "
     "(end, edge_count, references, large_immediates)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "earmark.extract._native",
    "Compiled inner loops of function recovery (optional accelerator).", -1, methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModule_Create(&module_definition);
}
