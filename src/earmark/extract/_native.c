/* Compiled core of function recovery (earmark.extract.disasm, .functions, .function_starts and
 * .function_features): an instruction table that decoding fills, the descent loop of
 * FunctionRecovery.explore over it, function bodies as arrays of table rows, instruction
 * ownership, and the per-instruction pass of build_features.
 *
 * Why C: per decoded instruction the Python path keeps a 10-field tuple, its int objects and
 * three dict entries (decode cache, function body, ownership map): measured ~350 bytes, 35 MB
 * of the 65 MB that recovery of zstandard _cffi (150k instructions) holds, and most of
 * recovery's CPU is interpreter work per instruction around capstone. Here an instruction is
 * one fixed-size row (Record) found by an address hash, its text-dependent part (Text) is
 * shared by every instruction with the same text, and Python objects are made only where the
 * rest of earmark asks for them: an Instruction tuple on demand (decode(), body[address]),
 * the branch/call bookkeeping of a body (leaders, successors, calls: one entry per branch, not
 * per instruction) and the callbacks for the rare paths (import thunks, indirect jumps).
 *
 * What an instruction *means* (operand classes, targets, immediates) is still decided by the
 * Python ``InstructionDecoder._analyse``, called for each instruction text not seen before, so
 * there is one implementation of the normalisation; the exception is a direct branch to a new
 * target ("call 0x401000"), built here from the Python answer for its mnemonic, because such
 * texts are a third of all cache misses.
 *
 * Capstone is not linked at build time: the Python side hands over the addresses of
 * cs_disasm/cs_free/cs_errno from the library the capstone package already loaded, and the
 * layout of cs_insn as that package's ctypes structure declares it. The build therefore needs
 * only a C compiler and the Python headers, and always matches the installed capstone.
 *
 * The pure-Python loops stay the reference: tests run both and compare every feature.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef size_t (*cs_disasm_fn)(size_t handle, const uint8_t *code, size_t code_size,
                               uint64_t address, size_t count, void **insn);
typedef void (*cs_free_fn)(void *insn, size_t count);
typedef int (*cs_errno_fn)(size_t handle);
typedef void *(*cs_malloc_fn)(size_t handle);
typedef int (*cs_disasm_iter_fn)(size_t handle, const uint8_t **code, size_t *size,
                                 uint64_t *address, void *insn);

static cs_disasm_fn disasm_function = NULL;
static cs_free_fn free_function = NULL;
static cs_errno_fn errno_function = NULL;
static cs_malloc_fn malloc_function = NULL;
static cs_disasm_iter_fn iter_function = NULL;
static Py_ssize_t insn_bytes = 0; /* sizeof(cs_insn) */
static Py_ssize_t address_offset = 0, size_offset = 0, mnemonic_offset = 0, op_str_offset = 0;
static Py_ssize_t mnemonic_capacity = 0, op_str_capacity = 0;

#define ANALYSIS_FIELDS 8
#define INSTRUCTION_FIELDS 10

/* Instruction kinds (disasm.KIND_*). */
#define KIND_PLAIN 0
#define KIND_CONDITIONAL 1
#define KIND_JUMP 2
#define KIND_CALL 3

/* Record flags. */
#define FLAG_INVALID 1 /* bytes that do not decode, or not code: decode() answers None */
#define FLAG_TARGET 2
#define FLAG_MEMORY 4
#define FLAG_OWNED 8   /* coverage: owner holds the start of the function reaching it */
#define FLAG_SHARED 16 /* coverage: several functions reach it (disasm.SHARED_OWNER) */

static PyObject *
configure(PyObject *module, PyObject *args)
{
    unsigned long long disasm_address, free_address, errno_address, malloc_address, iter_address;
    if (!PyArg_ParseTuple(args, "KKKKKnnnnnnn", &disasm_address, &free_address, &errno_address,
                          &malloc_address, &iter_address, &insn_bytes, &address_offset,
                          &size_offset, &mnemonic_offset, &mnemonic_capacity, &op_str_offset,
                          &op_str_capacity)) {
        return NULL;
    }
    if (!disasm_address || !free_address || !errno_address || !malloc_address || !iter_address ||
        insn_bytes <= 0) {
        PyErr_SetString(PyExc_ValueError, "capstone entry points or cs_insn layout missing");
        return NULL;
    }
    disasm_function = (cs_disasm_fn)(uintptr_t)disasm_address;
    free_function = (cs_free_fn)(uintptr_t)free_address;
    errno_function = (cs_errno_fn)(uintptr_t)errno_address;
    malloc_function = (cs_malloc_fn)(uintptr_t)malloc_address;
    iter_function = (cs_disasm_iter_fn)(uintptr_t)iter_address;
    Py_RETURN_NONE;
}

/* A NUL-terminated ASCII field of cs_insn as str (capstone writes ASCII only; a non-ASCII byte
 * raises UnicodeDecodeError, as bytes.decode("ascii") does on the Python path). */
static PyObject *
text_field(const char *field, size_t length)
{
    return PyUnicode_DecodeASCII(field, (Py_ssize_t)length, "strict");
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

/* The target of a direct branch whose operand text is exactly "0x" and 1-16 lower-case hex
 * digits without leading zeros (how capstone prints it), so that the text can be printed back
 * from the value; -1 for any other text (left to the Python analysis). */
static int
direct_target(const char *text, uint64_t *target)
{
    if (text[0] != '0' || text[1] != 'x' || text[2] == 0) {
        return -1;
    }
    uint64_t value = 0;
    int digits = 0;
    for (const char *c = text + 2; *c; c++, digits++) {
        int nibble;
        if (*c >= '0' && *c <= '9') {
            nibble = *c - '0';
        } else if (*c >= 'a' && *c <= 'f') {
            nibble = *c - 'a' + 10;
        } else {
            return -1;
        }
        if (digits == 16 || (digits == 1 && value == 0)) {
            return -1;
        }
        value = (value << 4) | (uint64_t)nibble;
    }
    *target = value;
    return 0;
}

/* --- text memo: instruction text (as capstone wrote it) -> row of the texts array ----------
 * A hit costs a hash over the text and one compare, instead of two new str objects, a key
 * tuple and up to two dict lookups with fresh string hashes. */

typedef struct {
    uint64_t hash;
    char *text; /* mnemonic, NUL, op_str; NULL for an empty slot */
    uint16_t mnemonic_length, op_str_length; /* cs_insn fields hold 32 and 160 bytes */
    uint32_t value;
} MemoEntry;

typedef struct {
    MemoEntry *entries;
    size_t capacity; /* a power of two */
    size_t used;
} Memo;

static int
memo_init(Memo *memo)
{
    memo->capacity = 1024;
    memo->used = 0;
    memo->entries = PyMem_Calloc(memo->capacity, sizeof(MemoEntry));
    if (memo->entries == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void
memo_clear(Memo *memo)
{
    if (memo->entries == NULL) {
        return;
    }
    for (size_t i = 0; i < memo->capacity; i++) {
        PyMem_Free(memo->entries[i].text);
    }
    PyMem_Free(memo->entries);
    memo->entries = NULL;
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

/* Remembers value for a text not yet present; 0, or -1 with MemoryError. */
static int
memo_add(Memo *memo, uint64_t hash, const char *mnemonic, size_t mnemonic_length,
         const char *op_str, size_t op_str_length, uint32_t value)
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
    entry->mnemonic_length = (uint16_t)mnemonic_length;
    entry->op_str_length = (uint16_t)op_str_length;
    entry->value = value;
    memo->used++;
    return 0;
}

/* --- the table ----------------------------------------------------------------------------- */

/* What every instruction with one text shares (an _OperandAnalysis plus its op_str). */
typedef struct {
    PyObject *mnemonic, *token, *address_immediates, *large_immediates; /* owned */
    PyObject *op_str; /* owned; NULL for a direct branch: printed from the record's target */
    uint64_t target, memory; /* memory: absolute address, or RIP displacement mod 2**64 */
    uint8_t kind, has_target, memory_kind, is_mov, is_lea; /* memory_kind 0 none 1 fixed 2 rip */
    uint8_t is_endbr;
    /* What build_features derives from the token (function_features.token_features), asked
     * once per text: MinHash token id, the robust token's id, the token's immediates. */
    uint8_t has_features, has_robust;
    uint64_t token_id, robust_id;
    PyObject *immediates; /* owned once has_features */
} Text;

/* One decoded address (32 bytes, against ~350 for the tuple and dict entries it replaces).
 * The memory operand's address is not stored: it follows from the text (fixed, or RIP-relative
 * to the next instruction). */
typedef struct {
    uint64_t address, target;
    uint32_t text, stamp; /* stamp: serial of the last explore that took it into its body */
    uint32_t owner;       /* coverage: index into the table's owner starts, with FLAG_OWNED */
    uint16_t size;
    uint8_t flags;
} Record;

typedef struct {
    PyObject_HEAD
    size_t handle;
    uint64_t address_mask;
    Py_ssize_t window;
    Py_ssize_t segment_count;
    uint64_t *segment_starts, *segment_lengths;
    uint8_t *segment_executable;
    PyObject **segment_data; /* owned bytes objects */
    PyObject *shared, *local, *analyse, *instruction_type, *no_values;
    Record *records;
    uint32_t count, capacity;
    uint32_t *slots; /* address hash: row + 1, 0 empty */
    size_t slot_capacity;
    Text *texts;
    uint32_t text_count, text_capacity;
    Memo memo, branch_memo;
    uint32_t serial;
    uint64_t *owner_starts; /* function starts that own instructions, by index */
    uint32_t owner_count, owner_capacity;
    PyObject *owner_indexes; /* start -> index into owner_starts */
    /* disasm.py's tables for analyse_in_c. */
    PyObject *register_classes, *memory_sizes, *end_mnemonics, *conditional_extra;
    int64_t small_limit;
} TableObject;

typedef struct {
    PyObject_HEAD
    TableObject *table;
    uint32_t *order;  /* rows in the order explore took them */
    uint32_t *sorted; /* the same rows by address */
    Py_ssize_t length;
    /* Kept by explore in place of leaders and successors (see Flow in _native_body.h). */
    Py_ssize_t block_count, edge_count, conditional_count;
    uint64_t *conditional; /* targets of its conditional branches other than its start */
} BodyObject;

static PyTypeObject TableType;
static PyTypeObject BodyType;

static inline size_t
address_slot(uint64_t address, size_t capacity)
{
    return (size_t)((address * 0x9E3779B97F4A7C15ULL) >> 20) & (capacity - 1);
}

/* Row of ``address``, or -1. */
static inline int64_t
table_find(TableObject *self, uint64_t address)
{
    size_t mask = self->slot_capacity - 1;
    for (size_t i = address_slot(address, self->slot_capacity);; i = (i + 1) & mask) {
        uint32_t row = self->slots[i];
        if (row == 0) {
            return -1;
        }
        if (self->records[row - 1].address == address) {
            return row - 1;
        }
    }
}

/* A new row for ``address`` (not present), or -1 with MemoryError. */
static int64_t
table_append(TableObject *self, uint64_t address)
{
    if (self->count == UINT32_MAX - 1) {
        PyErr_SetString(PyExc_MemoryError, "instruction table full");
        return -1;
    }
    if (self->count == self->capacity) {
        uint32_t capacity = self->capacity ? self->capacity * 2 : 4096;
        Record *records = PyMem_Realloc(self->records, (size_t)capacity * sizeof(Record));
        if (records == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->records = records;
        self->capacity = capacity;
    }
    if (2 * ((size_t)self->count + 1) > self->slot_capacity) {
        size_t capacity = self->slot_capacity * 2;
        uint32_t *slots = PyMem_Calloc(capacity, sizeof(uint32_t));
        if (slots == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (uint32_t row = 0; row < self->count; row++) {
            size_t i = address_slot(self->records[row].address, capacity);
            while (slots[i] != 0) {
                i = (i + 1) & (capacity - 1);
            }
            slots[i] = row + 1;
        }
        PyMem_Free(self->slots);
        self->slots = slots;
        self->slot_capacity = capacity;
    }
    uint32_t row = self->count++;
    Record *record = &self->records[row];
    memset(record, 0, sizeof *record);
    record->address = address;
    size_t i = address_slot(address, self->slot_capacity);
    while (self->slots[i] != 0) {
        i = (i + 1) & (self->slot_capacity - 1);
    }
    self->slots[i] = row + 1;
    return row;
}

/* Index of the segment holding ``address`` as disasm.InstructionDecoder.segment_at finds it
 * (the last one starting at or below it, if it reaches that far), or -1. */
static Py_ssize_t
table_segment(TableObject *self, uint64_t address)
{
    Py_ssize_t low = 0, high = self->segment_count; /* bisect_right over the starts */
    while (low < high) {
        Py_ssize_t middle = (low + high) / 2;
        if (address < self->segment_starts[middle]) {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    Py_ssize_t index = low - 1;
    if (index < 0 || address - self->segment_starts[index] >= self->segment_lengths[index]) {
        return -1;
    }
    return index;
}

static inline int
table_is_code(TableObject *self, uint64_t address)
{
    Py_ssize_t index = table_segment(self, address);
    return index >= 0 && self->segment_executable[index];
}

/* A Python int that is a valid address: its value, 1; an int outside 0..2**64-1: 0; -1 with an
 * error for anything else. */
static int
address_value(PyObject *object, uint64_t *value)
{
    if (!PyLong_Check(object)) {
        PyErr_SetString(PyExc_TypeError, "addresses must be int");
        return -1;
    }
    int overflow = 0;
    long long small = PyLong_AsLongLongAndOverflow(object, &overflow);
    if (small == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (!overflow) {
        if (small < 0) {
            return 0;
        }
        *value = (uint64_t)small;
        return 1;
    }
    if (overflow < 0) {
        return 0;
    }
    *value = PyLong_AsUnsignedLongLong(object);
    if (*value == (uint64_t)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            return -1;
        }
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* A text row for a new analysis (the 8-field _OperandAnalysis) and its op_str; -1 on error. */
static int64_t
text_from_analysis(TableObject *self, PyObject *op_str, PyObject *analysis)
{
    if (!PyTuple_Check(analysis) || PyTuple_GET_SIZE(analysis) != ANALYSIS_FIELDS) {
        PyErr_SetString(PyExc_TypeError, "analyse must return an 8-field tuple");
        return -1;
    }
    if (self->text_count == self->text_capacity) {
        uint32_t capacity = self->text_capacity ? self->text_capacity * 2 : 1024;
        Text *texts = PyMem_Realloc(self->texts, (size_t)capacity * sizeof(Text));
        if (texts == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->texts = texts;
        self->text_capacity = capacity;
    }
    Text text;
    memset(&text, 0, sizeof text);
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(analysis, 2));
    if (kind == -1 && PyErr_Occurred()) {
        return -1;
    }
    text.kind = (uint8_t)kind;
    PyObject *target = PyTuple_GET_ITEM(analysis, 3);
    PyObject *fixed = PyTuple_GET_ITEM(analysis, 4);
    PyObject *displacement = PyTuple_GET_ITEM(analysis, 5);
    if (target != Py_None) {
        text.target = PyLong_AsUnsignedLongLong(target); /* masked by the analysis */
        if (text.target == (uint64_t)-1 && PyErr_Occurred()) {
            return -1;
        }
        text.has_target = 1;
    }
    if (displacement != Py_None) {
        /* (address + size + displacement) mod 2**64 needs the displacement mod 2**64 only. */
        text.memory = PyLong_AsUnsignedLongLongMask(displacement);
        if (text.memory == (uint64_t)-1 && PyErr_Occurred()) {
            return -1;
        }
        text.memory_kind = 2;
    } else if (fixed != Py_None) {
        text.memory = PyLong_AsUnsignedLongLong(fixed);
        if (text.memory == (uint64_t)-1 && PyErr_Occurred()) {
            return -1;
        }
        text.memory_kind = 1;
    }
    text.mnemonic = PyTuple_GET_ITEM(analysis, 0);
    text.token = PyTuple_GET_ITEM(analysis, 1);
    text.address_immediates = PyTuple_GET_ITEM(analysis, 6);
    text.large_immediates = PyTuple_GET_ITEM(analysis, 7);
    if (!PyUnicode_Check(text.mnemonic) || !PyTuple_Check(text.address_immediates) ||
        !PyTuple_Check(text.large_immediates)) {
        PyErr_SetString(PyExc_TypeError, "malformed instruction analysis");
        return -1;
    }
    text.is_mov = PyUnicode_CompareWithASCIIString(text.mnemonic, "mov") == 0;
    text.is_lea = PyUnicode_CompareWithASCIIString(text.mnemonic, "lea") == 0;
    text.is_endbr = PyUnicode_CompareWithASCIIString(text.mnemonic, "endbr64") == 0 ||
                    PyUnicode_CompareWithASCIIString(text.mnemonic, "endbr32") == 0;
    text.op_str = op_str;
    Py_INCREF(text.mnemonic);
    Py_INCREF(text.token);
    Py_INCREF(text.address_immediates);
    Py_INCREF(text.large_immediates);
    Py_XINCREF(text.op_str);
    self->texts[self->text_count] = text;
    return self->text_count++;
}


/* --- instruction text analysis --------------------------------------------------------------
 * The common cases of InstructionDecoder._analyse_text, done here so that a text seen for the
 * first time costs no Python call (measured: 85k new texts on pillow _imaging, ~0.45 s of
 * Python). The tables (register classes, memory sizes, end and conditional mnemonics, the
 * small-immediate limit) are handed over from disasm.py, so they have one definition. Any text
 * this code is not sure about (prefixed mnemonics, int 0x29, numbers past 64 bits, operands of
 * an unknown shape) is answered None and goes to the Python analysis, which stays the
 * reference: tests decode arbitrary bytes both ways and compare every field. */

#define ROLE_NONE 0
#define ROLE_TARGET 1
#define ROLE_FIXED_MEMORY 2
#define ROLE_RIP_MEMORY 3
#define ROLE_ADDRESS_IMMEDIATE 4
#define ROLE_LARGE_IMMEDIATE 5

/* _parse_int of a text of ``length`` bytes: 1 with sign and magnitude, 0 when not a number,
 * 2 when it is a number past 64 bits (left to Python). */
static int
parse_number(const char *text, size_t length, int *negative, uint64_t *magnitude)
{
    while (length && (*text == ' ' || *text == '\t')) {
        text++, length--;
    }
    while (length && (text[length - 1] == ' ' || text[length - 1] == '\t')) {
        length--;
    }
    *negative = length && *text == '-';
    if (*negative) {
        text++, length--;
        while (length && (*text == ' ' || *text == '\t')) {
            text++, length--;
        }
    }
    uint64_t value = 0;
    if (length >= 2 && text[0] == '0' && text[1] == 'x') {
        if (length == 2) {
            return 0;
        }
        for (size_t i = 2; i < length; i++) {
            char c = text[i];
            int nibble = c >= '0' && c <= '9'   ? c - '0'
                        : c >= 'a' && c <= 'f' ? c - 'a' + 10
                        : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                               : -1;
            if (nibble < 0) {
                return 0;
            }
            if (value >> 60) {
                return 2;
            }
            value = value << 4 | (uint64_t)nibble;
        }
    } else {
        if (length == 0) {
            return 0;
        }
        for (size_t i = 0; i < length; i++) {
            if (text[i] < '0' || text[i] > '9') {
                return 0;
            }
        }
        for (size_t i = 0; i < length; i++) {
            uint64_t decimal = (uint64_t)(text[i] - '0');
            if (value > (UINT64_MAX - decimal) / 10) {
                return 2;
            }
            value = value * 10 + decimal;
        }
    }
    *magnitude = value;
    return 1;
}

static int64_t
sign_extend(uint64_t value, int bits)
{
    if (bits == 32) {
        return (int64_t)(int32_t)(uint32_t)value;
    }
    return (int64_t)value;
}

/* Appends text to the token buffer; -1 when it would not fit (left to Python). */
static int
token_append(char *token, size_t *used, size_t capacity, const char *text, size_t length)
{
    if (*used + length + 1 > capacity) {
        return -1;
    }
    memcpy(token + *used, text, length);
    *used += length;
    token[*used] = 0;
    return 0;
}

/* A str value of a dict keyed by the str made of ``text``: its UTF-8, or NULL (not there, or
 * an error is set). */
static const char *
lookup_class(PyObject *table, const char *text, size_t length, Py_ssize_t *size)
{
    PyObject *key = PyUnicode_DecodeASCII(text, (Py_ssize_t)length, "strict");
    if (key == NULL) {
        PyErr_Clear(); /* not ASCII: left to Python */
        return NULL;
    }
    PyObject *value = PyDict_GetItemWithError(table, key); /* borrowed */
    Py_DECREF(key);
    if (value == NULL || !PyUnicode_Check(value)) {
        return NULL;
    }
    return PyUnicode_AsUTF8AndSize(value, size);
}

/* The class of one operand (into ``class_text``), its role and value; 1 done, 0 left to
 * Python, -1 error. */
static int
classify_operand(TableObject *self, const char *operand, size_t length, int branch,
                 char *class_text, size_t class_capacity, int *role, uint64_t *value)
{
    size_t used = 0;
    class_text[0] = 0;
    *role = ROLE_NONE;
    *value = 0;
    const char *bracket = memchr(operand, '[', length);
    if (bracket != NULL) {
        size_t prefix_length = (size_t)(bracket - operand);
        const char *inner = bracket + 1;
        size_t inner_length = length - prefix_length - 1;
        while (inner_length && inner[inner_length - 1] == ']') {
            inner_length--;
        }
        if (memchr(inner, ']', inner_length) || memchr(inner, '[', inner_length)) {
            return 0;
        }
        const char *memory_class = "m";
        Py_ssize_t memory_class_length = 1;
        if (prefix_length) {
            const char *space = memchr(operand, ' ', prefix_length);
            size_t word = space ? (size_t)(space - operand) : prefix_length;
            const char *sized = lookup_class(self->memory_sizes, operand, word, &memory_class_length);
            if (sized != NULL) {
                memory_class = sized;
            } else if (PyErr_Occurred()) {
                return -1;
            } else {
                memory_class_length = 1;
            }
            const char *colon = NULL;
            for (size_t i = 0; i < prefix_length; i++) {
                if (operand[i] == ':') {
                    colon = operand + i;
                }
            }
            if (colon != NULL) { /* fs:/gs: (TEB, TLS, stack cookie) stays visible */
                const char *segment = operand;
                for (const char *c = operand; c < colon; c++) {
                    if (*c == ' ') {
                        segment = c + 1;
                    }
                }
                if (token_append(class_text, &used, class_capacity, segment,
                                 (size_t)(colon - segment)) < 0 ||
                    token_append(class_text, &used, class_capacity, ":", 1) < 0) {
                    return 0;
                }
            }
        }
        if (token_append(class_text, &used, class_capacity, memory_class,
                         (size_t)memory_class_length) < 0) {
            return 0;
        }
        if (inner_length >= 3 && memcmp(inner, "rip", 3) == 0) {
            uint64_t displacement = 0;
            if (inner_length > 3) {
                char compact[64];
                size_t compact_length = 0;
                for (size_t i = 3; i < inner_length; i++) {
                    if (inner[i] != ' ') {
                        if (compact_length == sizeof compact) {
                            return 0;
                        }
                        compact[compact_length++] = inner[i];
                    }
                }
                size_t skip = 0;
                while (skip < compact_length && compact[skip] == '+') {
                    skip++;
                }
                int negative;
                uint64_t magnitude;
                if (parse_number(compact + skip, compact_length - skip, &negative, &magnitude) !=
                    1) {
                    return 0;
                }
                displacement = negative ? 0 - magnitude : magnitude;
            }
            *role = ROLE_RIP_MEMORY;
            *value = displacement;
            return token_append(class_text, &used, class_capacity, "[addr]", 6) < 0 ? 0 : 1;
        }
        int negative;
        uint64_t magnitude;
        int number = parse_number(inner, inner_length, &negative, &magnitude);
        if (number == 2) {
            return 0;
        }
        if (number == 1) {
            *role = ROLE_FIXED_MEMORY;
            *value = (negative ? 0 - magnitude : magnitude) & self->address_mask;
            return token_append(class_text, &used, class_capacity, "[addr]", 6) < 0 ? 0 : 1;
        }
        if (inner_length >= 3 &&
            (memcmp(inner, "rsp", 3) == 0 || memcmp(inner, "esp", 3) == 0 ||
             memcmp(inner, "rbp", 3) == 0 || memcmp(inner, "ebp", 3) == 0)) {
            return token_append(class_text, &used, class_capacity, "[stack]", 7) < 0 ? 0 : 1;
        }
        return 1;
    }
    Py_ssize_t register_length;
    const char *register_class =
        lookup_class(self->register_classes, operand, length, &register_length);
    if (register_class != NULL) {
        return token_append(class_text, &used, class_capacity, register_class,
                            (size_t)register_length) < 0
                   ? 0
                   : 1;
    }
    if (PyErr_Occurred()) {
        return -1;
    }
    int negative;
    uint64_t magnitude;
    int number = parse_number(operand, length, &negative, &magnitude);
    if (number == 2) {
        return 0;
    }
    if (number == 0) { /* far pointers "0x10:0x2000" and other oddities */
        return token_append(class_text, &used, class_capacity, "other", 5) < 0 ? 0 : 1;
    }
    uint64_t raw = negative ? 0 - magnitude : magnitude;
    if (branch) {
        *role = ROLE_TARGET;
        *value = raw & self->address_mask;
        return token_append(class_text, &used, class_capacity, "addr", 4) < 0 ? 0 : 1;
    }
    int bits = self->address_mask == UINT32_MAX ? 32 : 64;
    uint64_t unsigned_value = raw & self->address_mask;
    int64_t signed_value = sign_extend(unsigned_value, bits);
    int64_t limit = self->small_limit;
    if (unsigned_value >> 32 == 0) {
        int64_t narrow = sign_extend(unsigned_value, 32);
        if (narrow > -limit && narrow < limit) {
            signed_value = narrow; /* "and eax, 0xffffffff" is -1 too */
        }
    }
    if (signed_value > -limit && signed_value < limit) {
        char printed[32];
        int written = signed_value < 0
                          ? snprintf(printed, sizeof printed, "-0x%llx",
                                     (unsigned long long)(0 - (uint64_t)signed_value))
                          : snprintf(printed, sizeof printed, "0x%llx",
                                     (unsigned long long)signed_value);
        return token_append(class_text, &used, class_capacity, printed, (size_t)written) < 0 ? 0
                                                                                           : 1;
    }
    Py_ssize_t segment = table_segment(self, unsigned_value);
    *value = unsigned_value;
    if (segment >= 0) {
        *role = ROLE_ADDRESS_IMMEDIATE;
        return token_append(class_text, &used, class_capacity, "addr", 4) < 0 ? 0 : 1;
    }
    *role = ROLE_LARGE_IMMEDIATE;
    return token_append(class_text, &used, class_capacity, "imm", 3) < 0 ? 0 : 1;
}

/* KIND_* of a mnemonic without prefixes (as _classify_mnemonic), or -2 when it has a space or
 * is "int" (left to Python); -1 error. */
static int
classify_mnemonic(TableObject *self, const char *text, size_t length, PyObject *mnemonic)
{
    if (memchr(text, ' ', length) || (length == 3 && memcmp(text, "int", 3) == 0)) {
        return -2;
    }
    int end = PySet_Contains(self->end_mnemonics, mnemonic);
    if (end != 0) {
        return end < 0 ? -1 : 4; /* KIND_END */
    }
    if (length == 3 && memcmp(text, "jmp", 3) == 0) {
        return KIND_JUMP;
    }
    if (length == 4 && memcmp(text, "call", 4) == 0) {
        return KIND_CALL;
    }
    if (length && text[0] == 'j') {
        return KIND_CONDITIONAL;
    }
    int extra = PySet_Contains(self->conditional_extra, mnemonic);
    return extra < 0 ? -1 : extra ? KIND_CONDITIONAL : KIND_PLAIN;
}

/* The 8-field analysis (_OperandAnalysis order) of a text, or NULL: with an error set, or
 * without one when the text is left to the Python analysis. */
static PyObject *
analyse_in_c(TableObject *self, int kind, PyObject *mnemonic, const char *op_str,
             size_t op_str_length)
{
    if (kind != KIND_PLAIN && op_str_length >= 2 && op_str[0] == '0' && op_str[1] == 'x' &&
        memchr(op_str, ',', op_str_length) == NULL) {
        return NULL; /* a branch to a number not printed the usual way: Python's rule */
    }
    char token[512];
    size_t used = 0;
    Py_ssize_t mnemonic_length;
    const char *mnemonic_text = PyUnicode_AsUTF8AndSize(mnemonic, &mnemonic_length);
    if (mnemonic_text == NULL || token_append(token, &used, sizeof token, mnemonic_text,
                                              (size_t)mnemonic_length) < 0) {
        return NULL;
    }
    PyObject *target = Py_None, *fixed = Py_None, *displacement = Py_None;
    PyObject *address_list = PyList_New(0), *large_list = PyList_New(0);
    PyObject *result = NULL;
    int handled = address_list != NULL && large_list != NULL;
    uint64_t target_value = 0, fixed_value = 0, displacement_value = 0;
    int has_target = 0, memory_role = 0;
    if (handled && op_str_length) {
        token_append(token, &used, sizeof token, " ", 1);
        const char *operand = op_str;
        const char *end = op_str + op_str_length;
        int first = 1;
        while (handled) {
            const char *next = operand;
            while (next < end && !(next[0] == ',' && next + 1 < end && next[1] == ' ')) {
                next++;
            }
            char class_text[128];
            int role;
            uint64_t value;
            int done = classify_operand(self, operand, (size_t)(next - operand), kind != KIND_PLAIN,
                                        class_text, sizeof class_text, &role, &value);
            if (done <= 0 || (!first && token_append(token, &used, sizeof token, ",", 1) < 0) ||
                token_append(token, &used, sizeof token, class_text, strlen(class_text)) < 0) {
                handled = 0;
                break;
            }
            first = 0;
            if (role == ROLE_TARGET) {
                target_value = value, has_target = 1;
            } else if (role == ROLE_FIXED_MEMORY) {
                fixed_value = value, memory_role = 1;
            } else if (role == ROLE_RIP_MEMORY) {
                displacement_value = value, memory_role = 2;
            } else if (role == ROLE_ADDRESS_IMMEDIATE || role == ROLE_LARGE_IMMEDIATE) {
                PyObject *number = PyLong_FromUnsignedLongLong(value);
                if (number == NULL ||
                    PyList_Append(role == ROLE_ADDRESS_IMMEDIATE ? address_list : large_list,
                                  number) < 0) {
                    handled = 0;
                }
                Py_XDECREF(number);
            }
            if (next >= end) {
                break;
            }
            operand = next + 2;
        }
    }
    if (handled && !PyErr_Occurred()) {
        PyObject *token_object = PyUnicode_FromStringAndSize(token, (Py_ssize_t)used);
        if (token_object != NULL) {
            /* Interned: ~70k instruction texts share ~3k tokens. */
            PyUnicode_InternInPlace(&token_object);
        }
        target = has_target ? PyLong_FromUnsignedLongLong(target_value) : Py_NewRef(Py_None);
        fixed = memory_role == 1 ? PyLong_FromUnsignedLongLong(fixed_value) : Py_NewRef(Py_None);
        /* The displacement as a signed number, as the Python analysis gives it. */
        displacement = memory_role == 2 ? PyLong_FromLongLong((int64_t)displacement_value)
                                        : Py_NewRef(Py_None);
        PyObject *address_tuple = PyList_AsTuple(address_list);
        PyObject *large_tuple = PyList_AsTuple(large_list);
        if (token_object && target && fixed && displacement && address_tuple && large_tuple) {
            result = Py_BuildValue("(OOiOOOOO)", mnemonic, token_object, kind, target, fixed,
                                   displacement, address_tuple, large_tuple);
        }
        Py_XDECREF(token_object);
        Py_XDECREF(target);
        Py_XDECREF(fixed);
        Py_XDECREF(displacement);
        Py_XDECREF(address_tuple);
        Py_XDECREF(large_tuple);
    }
    Py_XDECREF(address_list);
    Py_XDECREF(large_list);
    return result;
}

/* Decodes a window at ``start`` (in an executable segment) into new rows, stopping at the
 * first instruction other than the first that the table already holds: from there on the
 * bytes are in sync with what is cached. 0, or -1 with an error. */
static int
table_decode_window(TableObject *self, uint64_t start)
{
    if (self->analyse == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the instruction table was cleared");
        return -1;
    }
    Py_ssize_t segment = table_segment(self, start);
    if (segment < 0 || !self->segment_executable[segment]) {
        return 0;
    }
    uint64_t offset = start - self->segment_starts[segment];
    uint64_t length = self->segment_lengths[segment] - offset;
    if (length > (uint64_t)self->window) {
        length = (uint64_t)self->window;
    }
    const uint8_t *code = (const uint8_t *)PyBytes_AS_STRING(self->segment_data[segment]);
    /* cs_disasm_iter, one instruction at a time into one cs_insn: the loop stops where it meets
     * a decoded instruction without decoding the rest of the window, and nothing is copied into
     * a result array (cs_disasm decoded 1.82M instructions for 1.35M kept on cryptography
     * _rust, each copied once more). */
    void *insn_buffer = malloc_function(self->handle);
    if (insn_buffer == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    const uint8_t *cursor = code + offset;
    size_t remaining = (size_t)length;
    uint64_t next_address = start;
    int failed = 0, decoded_any = 0;
    while (!failed &&
           iter_function(self->handle, &cursor, &remaining, &next_address, insn_buffer)) {
        decoded_any = 1;
        const char *insn = (const char *)insn_buffer;
        uint64_t insn_address;
        uint16_t insn_size;
        memcpy(&insn_address, insn + address_offset, sizeof insn_address);
        memcpy(&insn_size, insn + size_offset, sizeof insn_size);
        if (insn_address != start && table_find(self, insn_address) >= 0) {
            break;
        }
        const char *mnemonic_text = insn + mnemonic_offset;
        const char *op_str_text = insn + op_str_offset;
        size_t mnemonic_length = strnlen(mnemonic_text, (size_t)mnemonic_capacity);
        size_t op_str_length = strnlen(op_str_text, (size_t)op_str_capacity);
        uint64_t hash = text_hash(mnemonic_text, mnemonic_length, op_str_text, op_str_length);
        MemoEntry *known =
            memo_slot(&self->memo, hash, mnemonic_text, mnemonic_length, op_str_text, op_str_length);
        int64_t text = known->text != NULL ? (int64_t)known->value : -1;
        uint64_t direct = 0;
        int is_direct = 0;
        if (text < 0) {
            PyObject *mnemonic = text_field(mnemonic_text, mnemonic_length);
            /* Interned: the cache keys keep it, and a few hundred mnemonics spell ~70k texts. */
            if (mnemonic != NULL) {
                PyUnicode_InternInPlace(&mnemonic);
            }
            PyObject *op_str = mnemonic ? text_field(op_str_text, op_str_length) : NULL;
            PyObject *analysis = NULL;
            int kind = op_str ? classify_mnemonic(self, mnemonic_text, mnemonic_length, mnemonic)
                              : -1;
            if (kind > KIND_PLAIN && direct_target(op_str_text, &direct) == 0 &&
                (direct & self->address_mask) == direct) {
                /* A direct branch: one text row per mnemonic, the target in the record. */
                uint64_t mnemonic_hash = text_hash(mnemonic_text, mnemonic_length, "", 0);
                MemoEntry *entry = memo_slot(&self->branch_memo, mnemonic_hash, mnemonic_text,
                                             mnemonic_length, "", 0);
                if (entry->text != NULL) {
                    text = entry->value;
                } else {
                    PyObject *token = PyUnicode_FromFormat("%U addr", mnemonic);
                    if (token != NULL) {
                        PyUnicode_InternInPlace(&token);
                    }
                    PyObject *fields =
                        token ? Py_BuildValue("(OOiOOOOO)", mnemonic, token, kind, Py_None,
                                              Py_None, Py_None, self->no_values, self->no_values)
                              : NULL;
                    text = fields ? text_from_analysis(self, NULL, fields) : -1;
                    Py_XDECREF(fields);
                    Py_XDECREF(token);
                    if (text >= 0 && memo_add(&self->branch_memo, mnemonic_hash, mnemonic_text,
                                              mnemonic_length, "", 0, (uint32_t)text) < 0) {
                        text = -1;
                    }
                }
                is_direct = 1;
            } else if (kind >= 0) {
                analysis = analyse_in_c(self, kind, mnemonic, op_str_text, op_str_length);
            }
            /* Everything the compiled analysis leaves (kind -2 or a NULL analysis without an
             * error) goes to the Python analysis and its caches. */
            PyObject *key = op_str && !is_direct && analysis == NULL && !PyErr_Occurred()
                                ? PyTuple_Pack(2, mnemonic, op_str)
                                : NULL;
            if (key != NULL) {
                analysis = PyDict_GetItemWithError(self->shared, key); /* borrowed */
                if (analysis == NULL && !PyErr_Occurred()) {
                    analysis = PyDict_GetItemWithError(self->local, key);
                }
                Py_XINCREF(analysis);
            }
            if (key != NULL && analysis == NULL && !PyErr_Occurred()) {
                analysis = PyObject_CallObject(self->analyse, key);
            }
            if (analysis != NULL) {
                text = text_from_analysis(self, op_str, analysis);
                if (text >= 0 && memo_add(&self->memo, hash, mnemonic_text, mnemonic_length,
                                          op_str_text, op_str_length, (uint32_t)text) < 0) {
                    text = -1;
                }
                Py_DECREF(analysis);
            }
            Py_XDECREF(key);
            Py_XDECREF(op_str);
            Py_XDECREF(mnemonic);
            if (text < 0) {
                failed = 1;
                break;
            }
        }
        int64_t row = table_append(self, insn_address);
        if (row < 0) {
            failed = 1;
            break;
        }
        Record *record = &self->records[row];
        Text *shape = &self->texts[text];
        record->text = (uint32_t)text;
        record->size = insn_size;
        if (is_direct) {
            record->target = direct;
            record->flags |= FLAG_TARGET;
        } else if (shape->has_target) {
            record->target = shape->target;
            record->flags |= FLAG_TARGET;
        }
        if (shape->memory_kind != 0) {
            record->flags |= FLAG_MEMORY;
        }
    }
    free_function(insn_buffer, 1);
    if (!failed && !decoded_any) {
        int status = errno_function(self->handle);
        if (status != 0) { /* CS_ERR_OK; disasm_lite raises CsError here */
            PyErr_Format(PyExc_RuntimeError, "capstone error %d", status);
            return -1;
        }
    }
    return failed ? -1 : 0;
}

/* Row of the instruction at ``address``, decoding it if needed (a row flagged invalid when it
 * does not decode); -1 with an error. */
static int64_t
table_decode(TableObject *self, uint64_t address)
{
    int64_t row = table_find(self, address);
    if (row >= 0) {
        return row;
    }
    if (table_decode_window(self, address) < 0) {
        return -1;
    }
    row = table_find(self, address);
    if (row >= 0) {
        return row;
    }
    row = table_append(self, address);
    if (row >= 0) {
        self->records[row].flags = FLAG_INVALID;
    }
    return row;
}

/* The address of a row's memory operand (FLAG_MEMORY). */
static inline uint64_t
record_memory(const TableObject *self, const Record *record)
{
    const Text *text = &self->texts[record->text];
    return text->memory_kind == 2 ? record->address + record->size + text->memory : text->memory;
}

static PyObject *
u64_object(uint64_t value)
{
    return PyLong_FromUnsignedLongLong(value);
}

/* address + size as a Python int (past 2**64 near the top of a hostile 64-bit image). */
static PyObject *
following_object(const Record *record)
{
    uint64_t following = record->address + record->size;
    if (following >= record->address) {
        return u64_object(following);
    }
    PyObject *address = u64_object(record->address);
    PyObject *size = address ? PyLong_FromLong(record->size) : NULL;
    PyObject *sum = size ? PyNumber_Add(address, size) : NULL;
    Py_XDECREF(address);
    Py_XDECREF(size);
    return sum;
}

/* The Instruction tuple of a valid row (disasm.Instruction's fields). */
static PyObject *
instruction_object(TableObject *self, uint32_t row)
{
    const Record *record = &self->records[row];
    const Text *text = &self->texts[record->text];
    PyObject *values[INSTRUCTION_FIELDS] = {NULL};
    values[0] = u64_object(record->address);
    values[1] = PyLong_FromLong(record->size);
    values[2] = text->mnemonic;
    Py_INCREF(values[2]);
    if (text->op_str != NULL) {
        values[3] = text->op_str;
        Py_INCREF(values[3]);
    } else {
        char printed[24];
        snprintf(printed, sizeof printed, "0x%llx", (unsigned long long)record->target);
        values[3] = PyUnicode_FromString(printed);
    }
    values[4] = text->token;
    Py_INCREF(values[4]);
    values[5] = PyLong_FromLong(text->kind);
    values[6] = record->flags & FLAG_TARGET ? u64_object(record->target) : Py_NewRef(Py_None);
    values[7] = record->flags & FLAG_MEMORY ? u64_object(record_memory(self, record))
                                            : Py_NewRef(Py_None);
    values[8] = Py_NewRef(text->address_immediates);
    values[9] = Py_NewRef(text->large_immediates);
    PyTypeObject *kind = (PyTypeObject *)self->instruction_type;
    PyObject *instruction = NULL;
    int complete = kind != NULL;
    for (int f = 0; f < INSTRUCTION_FIELDS; f++) {
        complete &= values[f] != NULL;
    }
    if (complete) {
        instruction = kind->tp_alloc(kind, INSTRUCTION_FIELDS);
    }
    if (instruction == NULL) {
        for (int f = 0; f < INSTRUCTION_FIELDS; f++) {
            Py_XDECREF(values[f]);
        }
        return NULL;
    }
    for (int f = 0; f < INSTRUCTION_FIELDS; f++) {
        PyTuple_SET_ITEM(instruction, f, values[f]);
    }
    return instruction;
}

static PyObject *
row_object(TableObject *self, int64_t row)
{
    if (row < 0) {
        return NULL;
    }
    if (self->records[row].flags & FLAG_INVALID) {
        Py_RETURN_NONE;
    }
    return instruction_object(self, (uint32_t)row);
}

/* Table(handle, segments, window, address_mask, shared, local, analyse, kind, register_classes,
 *       memory_sizes, end_mnemonics, conditional_extra, small_limit) */
static PyObject *
table_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    unsigned long long handle, address_mask;
    Py_ssize_t window;
    PyObject *segments, *shared, *local, *analyse, *kind;
    PyObject *register_classes, *memory_sizes, *end_mnemonics, *conditional_extra;
    long long small_limit;
    if (!PyArg_ParseTuple(args, "KO!nKO!O!OO!O!O!OOL", &handle, &PyList_Type, &segments,
                          &window, &address_mask, &PyDict_Type, &shared, &PyDict_Type, &local,
                          &analyse, &PyType_Type, &kind, &PyDict_Type,
                          &register_classes, &PyDict_Type, &memory_sizes, &end_mnemonics,
                          &conditional_extra, &small_limit)) {
        return NULL;
    }
    if (!PyAnySet_Check(end_mnemonics) || !PyAnySet_Check(conditional_extra) ||
        small_limit <= 0 || (address_mask != UINT32_MAX && address_mask != UINT64_MAX)) {
        PyErr_SetString(PyExc_ValueError, "malformed instruction tables");
        return NULL;
    }
    if (disasm_function == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "earmark.extract._native.configure was not called");
        return NULL;
    }
    if (!PyType_IsSubtype((PyTypeObject *)kind, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "the instruction type must be a tuple subclass");
        return NULL;
    }
    TableObject *self = (TableObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->handle = (size_t)handle;
    self->address_mask = address_mask;
    self->window = window;
    self->shared = Py_NewRef(shared);
    self->local = Py_NewRef(local);
    self->analyse = Py_NewRef(analyse);
    self->instruction_type = Py_NewRef(kind);
    self->register_classes = Py_NewRef(register_classes);
    self->memory_sizes = Py_NewRef(memory_sizes);
    self->end_mnemonics = Py_NewRef(end_mnemonics);
    self->conditional_extra = Py_NewRef(conditional_extra);
    self->small_limit = small_limit;
    self->no_values = PyTuple_New(0);
    self->owner_indexes = PyDict_New();
    if (mnemonic_capacity > UINT16_MAX || op_str_capacity > UINT16_MAX) {
        PyErr_SetString(PyExc_ValueError, "cs_insn text fields longer than expected");
        Py_DECREF(self);
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(segments);
    self->segment_starts = PyMem_Calloc((size_t)count + 1, sizeof(uint64_t));
    self->segment_lengths = PyMem_Calloc((size_t)count + 1, sizeof(uint64_t));
    self->segment_executable = PyMem_Calloc((size_t)count + 1, 1);
    self->segment_data = PyMem_Calloc((size_t)count + 1, sizeof(PyObject *));
    self->slot_capacity = 8192;
    self->slots = PyMem_Calloc(self->slot_capacity, sizeof(uint32_t));
    if (self->no_values == NULL || self->owner_indexes == NULL || !self->segment_starts || !self->segment_lengths ||
        !self->segment_executable || !self->segment_data || !self->slots ||
        memo_init(&self->memo) < 0 || memo_init(&self->branch_memo) < 0) {
        if (!PyErr_Occurred()) {
            PyErr_NoMemory();
        }
        Py_DECREF(self);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *segment = PyList_GET_ITEM(segments, i);
        unsigned long long start;
        PyObject *data;
        int executable;
        if (!PyArg_ParseTuple(segment, "KO!p", &start, &PyBytes_Type, &data, &executable)) {
            Py_DECREF(self);
            return NULL;
        }
        if (i > 0 && start < self->segment_starts[i - 1]) {
            PyErr_SetString(PyExc_ValueError, "segments must be sorted by address");
            Py_DECREF(self);
            return NULL;
        }
        self->segment_starts[i] = start;
        self->segment_lengths[i] = (uint64_t)PyBytes_GET_SIZE(data);
        self->segment_executable[i] = (uint8_t)executable;
        self->segment_data[i] = Py_NewRef(data);
        self->segment_count = i + 1;
    }
    return (PyObject *)self;
}

/* Garbage-collector support: the table holds the decoder's bound ``analyse`` and the decoder
 * holds the table, a cycle that would otherwise never be freed if recovery stops early. */
static int
table_traverse(TableObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->shared);
    Py_VISIT(self->local);
    Py_VISIT(self->analyse);
    Py_VISIT(self->instruction_type);
    return 0;
}

static int
table_clear(TableObject *self)
{
    Py_CLEAR(self->shared);
    Py_CLEAR(self->local);
    Py_CLEAR(self->analyse);
    Py_CLEAR(self->instruction_type);
    return 0;
}

static void
table_dealloc(TableObject *self)
{
    PyObject_GC_UnTrack(self);
    for (Py_ssize_t i = 0; i < self->segment_count; i++) {
        Py_XDECREF(self->segment_data[i]);
    }
    PyMem_Free(self->segment_starts);
    PyMem_Free(self->segment_lengths);
    PyMem_Free(self->segment_executable);
    PyMem_Free(self->segment_data);
    for (uint32_t i = 0; i < self->text_count; i++) {
        Text *text = &self->texts[i];
        Py_DECREF(text->mnemonic);
        Py_DECREF(text->token);
        Py_DECREF(text->address_immediates);
        Py_DECREF(text->large_immediates);
        Py_XDECREF(text->op_str);
        Py_XDECREF(text->immediates);
    }
    PyMem_Free(self->texts);
    PyMem_Free(self->records);
    PyMem_Free(self->slots);
    PyMem_Free(self->owner_starts);
    Py_XDECREF(self->owner_indexes);
    memo_clear(&self->memo);
    memo_clear(&self->branch_memo);
    table_clear(self);
    Py_XDECREF(self->register_classes);
    Py_XDECREF(self->memory_sizes);
    Py_XDECREF(self->end_mnemonics);
    Py_XDECREF(self->conditional_extra);
    Py_XDECREF(self->no_values);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* decode(address) -> Instruction | None, as InstructionDecoder.decode. */
static PyObject *
table_decode_method(TableObject *self, PyObject *address_object)
{
    uint64_t address;
    int valid = address_value(address_object, &address);
    if (valid < 0) {
        return NULL;
    }
    if (!valid) {
        Py_RETURN_NONE; /* no segment holds it: the Python decoder answers None too */
    }
    return row_object(self, table_decode(self, address));
}

/* jump_slot(address) -> the memory operand's address of a ``jmp [mem]`` at ``address`` (after an
 * endbr64/endbr32), or None: what FunctionRecovery.import_thunk reads, without building the
 * Instruction tuples (it is asked for every call target and proposed start). */
static PyObject *
table_jump_slot(TableObject *self, PyObject *address_object)
{
    uint64_t address;
    int valid = address_value(address_object, &address);
    if (valid < 0) {
        return NULL;
    }
    int64_t row = valid ? table_decode(self, address) : -2;
    if (row == -1) {
        return NULL;
    }
    if (row >= 0 && !(self->records[row].flags & FLAG_INVALID) &&
        self->texts[self->records[row].text].is_endbr) {
        uint64_t next = address + self->records[row].size;
        row = next > address ? table_decode(self, next) : -2;
        if (row == -1) {
            return NULL;
        }
    }
    if (row < 0 || self->records[row].flags & FLAG_INVALID) {
        Py_RETURN_NONE;
    }
    const Record *record = &self->records[row];
    if (self->texts[record->text].kind != KIND_JUMP || !(record->flags & FLAG_MEMORY)) {
        Py_RETURN_NONE;
    }
    return u64_object(record_memory(self, record));
}

/* cached() -> {address: Instruction | None} of every row (for tests). */
static PyObject *
table_cached(TableObject *self, PyObject *unused)
{
    PyObject *result = PyDict_New();
    for (uint32_t row = 0; result != NULL && row < self->count; row++) {
        PyObject *key = u64_object(self->records[row].address);
        PyObject *value = key ? row_object(self, row) : NULL;
        if (value == NULL || PyDict_SetItem(result, key, value) < 0) {
            Py_CLEAR(result);
        }
        Py_XDECREF(key);
        Py_XDECREF(value);
    }
    return result;
}

/* owner(address) -> start of the function owning the instruction there, -1 when several do,
 * None when none does (CodeCoverage.owners.get). */
static PyObject *
table_owner(TableObject *self, PyObject *address_object)
{
    uint64_t address;
    int valid = address_value(address_object, &address);
    if (valid < 0) {
        return NULL;
    }
    int64_t row = valid ? table_find(self, address) : -1;
    if (row < 0 || !(self->records[row].flags & FLAG_OWNED)) {
        Py_RETURN_NONE;
    }
    if (self->records[row].flags & FLAG_SHARED) {
        return PyLong_FromLong(-1);
    }
    return u64_object(self->owner_starts[self->records[row].owner]);
}

#include "_native_body.h"

static PyMethodDef table_methods[] = {
    {"decode", (PyCFunction)table_decode_method, METH_O,
     "decode(address) -> Instruction | None (decoding a window when not cached)"},
    {"jump_slot", (PyCFunction)table_jump_slot, METH_O,
     "jump_slot(address) -> memory address of a jmp [mem] there (after endbr), or None"},
    {"cached", (PyCFunction)table_cached, METH_NOARGS,
     "cached() -> {address: Instruction | None} of everything decoded so far"},
    {"owner", (PyCFunction)table_owner, METH_O,
     "owner(address) -> owning function's start, -1 when shared, None when not owned"},
    {"explore", (PyCFunction)table_explore, METH_VARARGS, EXPLORE_DOC},
    {"tail_targets", (PyCFunction)table_tail_targets, METH_VARARGS,
     "tail_targets(bodies, starts) -> targets of direct jmps that cross another start"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "earmark.extract._native.Table",
    .tp_basicsize = sizeof(TableObject),
    .tp_dealloc = (destructor)table_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)table_traverse,
    .tp_clear = (inquiry)table_clear,
    .tp_doc = "Table(handle, segments, window, address_mask, shared, local, analyse, "
              "kind, register_classes, memory_sizes, end_mnemonics, conditional_extra, "
              "small_limit): the decoded instructions of one image",
    .tp_methods = table_methods,
    .tp_new = table_new,
};


/* --- MinHash --------------------------------------------------------------------------------
 * minhash.id_minhash_signatures in one pass per function: every n-gram shingle of its token
 * ids, then for each permutation the minimum of ((a * x + b) mod 2**64) >> 32. Repeated
 * shingles are not removed first: a minimum does not change, and a 64-multiply pass over a
 * repeat costs less than sorting (a qsort per function made an earlier version as slow as
 * numpy). Same integer arithmetic as the numpy reference, so the same signatures; the tests
 * compare the two. */

#define MAX_PERMUTATIONS 256

/* minhash_ids(ids, lengths, sizes, multiplier, mix, a, b) -> bytes
 * ids: uint64 token ids of all streams end to end; lengths: int64 per stream; sizes: tuple of
 * n-gram sizes; a, b: uint64 coefficients per permutation. Returns uint32 (streams x
 * permutations), 0xFFFFFFFF throughout for a stream without shingles. */
static PyObject *
minhash_ids(PyObject *module, PyObject *args)
{
    Py_buffer ids, lengths, a, b;
    PyObject *sizes;
    unsigned long long multiplier, mix;
    if (!PyArg_ParseTuple(args, "y*y*O!KKy*y*", &ids, &lengths, &PyTuple_Type, &sizes,
                          &multiplier, &mix, &a, &b)) {
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t id_count = ids.len / 8, streams = lengths.len / 8, permutations = a.len / 8;
    const uint64_t *id_values = ids.buf, *a_values = a.buf, *b_values = b.buf;
    const int64_t *length_values = lengths.buf;
    Py_ssize_t size_count = PyTuple_GET_SIZE(sizes);
    long size_values[8];
    int valid = a.len == b.len && size_count <= 8 && permutations <= MAX_PERMUTATIONS;
    for (Py_ssize_t i = 0; valid && i < size_count; i++) {
        size_values[i] = PyLong_AsLong(PyTuple_GET_ITEM(sizes, i));
        valid = size_values[i] > 0 && !PyErr_Occurred();
    }
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; valid && i < streams; i++) {
        valid = length_values[i] >= 0;
        total += length_values[i];
    }
    if (valid && total == id_count) {
        result = PyBytes_FromStringAndSize(NULL, streams * permutations * 4);
    } else if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_ValueError, "malformed MinHash input");
    }
    if (result != NULL) {
        uint32_t *out = (uint32_t *)PyBytes_AS_STRING(result);
        uint64_t minima[MAX_PERMUTATIONS];
        Py_ssize_t offset = 0;
        for (Py_ssize_t stream = 0; stream < streams; stream++) {
            Py_ssize_t length = length_values[stream];
            const uint64_t *tokens = id_values + offset;
            for (Py_ssize_t j = 0; j < permutations; j++) {
                minima[j] = 0xFFFFFFFFULL;
            }
            for (Py_ssize_t k = 0; k < size_count; k++) {
                long size = size_values[k];
                for (Py_ssize_t p = 0; p + size <= length; p++) {
                    uint64_t folded = tokens[p] ^ (uint64_t)size;
                    for (long shift = 1; shift < size; shift++) {
                        folded = folded * multiplier ^ tokens[p + shift];
                    }
                    uint64_t shingle = (uint32_t)((folded * mix) >> 32);
                    for (Py_ssize_t j = 0; j < permutations; j++) {
                        uint64_t value = (shingle * a_values[j] + b_values[j]) >> 32;
                        minima[j] = value < minima[j] ? value : minima[j];
                    }
                }
            }
            for (Py_ssize_t j = 0; j < permutations; j++) {
                out[stream * permutations + j] = (uint32_t)minima[j];
            }
            offset += length;
        }
    }
    PyBuffer_Release(&ids);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return result;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(cs_disasm, cs_free, cs_errno, cs_malloc, cs_disasm_iter, insn_size, "
     "address_offset, size_offset, "
     "mnemonic_offset, mnemonic_size, op_str_offset, op_str_size)"},
    {"starts_containing", starts_containing, METH_VARARGS,
     "starts_containing(bodies, address) -> starts whose body holds the address"},
    {"minhash_ids", minhash_ids, METH_VARARGS,
     "minhash_ids(ids, lengths, sizes, multiplier, mix, a, b) -> uint32 signatures (bytes)"},
    {"body_spans", body_spans, METH_O,
     "body_spans(bodies) -> (addresses, sizes): uint64 bytes of every instruction of the bodies"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "earmark.extract._native",
    "Compiled core of function recovery (optional accelerator).", -1, methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    if (PyType_Ready(&TableType) < 0 || PyType_Ready(&BodyType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_definition);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "Table", (PyObject *)&TableType) < 0 ||
        PyModule_AddObjectRef(module, "Body", (PyObject *)&BodyType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
