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
 *
 * One compilation unit in parts: this file (capstone, the table, decoding, the module),
 * _native_memo.h (text memo), _native_rows.h (finding and adding rows), _native_analysis.h
 * (text analysis), _native_body.h (Body, ownership, feature pass), _native_coverage.h (known
 * starts, byte coverage), _native_explore.h (descent, heuristics), _native_minhash.h.
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

static int
text_is_ascii(const char *text, size_t length)
{
    for (size_t i = 0; i < length; i++) {
        if ((unsigned char)text[i] & 0x80) {
            return 0;
        }
    }
    return 1;
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

#include "_native_memo.h"

/* --- the table ----------------------------------------------------------------------------- */

/* What every instruction with one text shares (an _OperandAnalysis plus its op_str). */
typedef struct {
    PyObject *mnemonic, *token, *address_immediates, *large_immediates; /* owned */
    /* op_str: owned; made on first use (text_op_str) from op_str_text, the memo's copy of the
     * text (~1 in 4 decoded instructions is a new text, and few are ever asked for theirs). A
     * direct branch has neither: its op_str is printed from the record's target. */
    PyObject *op_str;
    const char *op_str_text;
    uint16_t op_str_length;
    uint8_t printed_target;
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

/* Where the row of an address is kept. Inside an executable segment (nearly every row): a
 * direct map, per segment, from each CODE_GRANULE bytes to a block of cells, one per byte
 * offset, holding row + 1 (0: none); blocks are made on first use. Consecutive instructions
 * then share cache lines, where a hash table cost a cache miss per probe (the largest cost of
 * decoding beside capstone), and no rehash is ever needed; 4 bytes per byte of code touched
 * is also less than the hash table's 16-32 bytes per instruction. Elsewhere (the invalid rows
 * of addresses outside executable code): a hash table of AddressSlot. */
#define CODE_GRANULE_BITS 8 /* 256 bytes: a 1 KB block, about two decode windows of code */
#define CODE_GRANULE ((uint64_t)1 << CODE_GRANULE_BITS)
/* Rows and texts reserved up front per byte of executable code: PE bench (a)'s 103 files
 * decoded 0.24-0.31 rows and made 0.04-0.13 new texts per byte of code, and the doublings
 * from small arrays copied both several times (~1.5 % of analysis). What is not reached is
 * never touched, so it costs address space, not memory. */
#define CODE_BYTES_PER_ROW 3
#define CODE_BYTES_PER_TEXT 10
/* At most this much is reserved (32 MB of rows, 26 MB of texts; about 3 MB of code), so a
 * large hostile code segment (up to the 128 MB file limit) grows its arrays as it decodes. */
#define RESERVED_ROWS_LIMIT ((size_t)1 << 20)
#define RESERVED_TEXTS_LIMIT ((size_t)1 << 18)

/* A slot of the address hash: the row (+1, 0 empty) and the address's low 32 bits, so that a
 * probe reads one cache line and a different address is mostly told apart without reading its
 * record. */
typedef struct {
    uint32_t tag, row;
} AddressSlot;

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
    uint32_t **granules; /* per executable segment: block number + 1 of each granule */
    uint32_t *cells;     /* the blocks, CODE_GRANULE cells each */
    size_t block_count, block_capacity, block_limit; /* limit: every granule of code */
    int disjoint_segments; /* no two segments overlap: any segment holding an address is it */
    /* Per executable segment, a bit per byte: the function starts FunctionRecovery knows
     * (its ``sources``, kept in step with mark_start), made on first use. Explore asks at
     * every instruction whether it flowed into another function; as a dict lookup that cost a
     * new int and a lookup per instruction. */
    uint8_t **start_bits;
    /* CodeCoverage's byte maps (see _native_coverage.h), made on first use. */
    Py_ssize_t cover_count;
    uint64_t *cover_bases, *cover_lengths;
    uint8_t **cover_maps;
    int cover_disjoint;
    Py_ssize_t last_segment;
    AddressSlot *slots; /* address hash outside executable segments, at most half full */
    size_t slot_capacity; /* a power of two: 2**(64 - slot_shift) */
    size_t slot_used;
    int slot_shift;
    Text *texts;
    uint32_t text_count, text_capacity;
    Memo memo, branch_memo;
    Names names; /* mnemonics and tokens */
    AddressMap thunks; /* address -> import name or None (table_thunk) */
    ClassMap register_class_map, memory_size_map; /* copies of the two dicts below */
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

#include "_native_rows.h"

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

/* Appends ``text``, taking over its references (mnemonic, token, immediates, op_str; released
 * on failure): its row, or -1 with an error. */
static int64_t
text_append(TableObject *self, Text *text)
{
    if (self->text_count == self->text_capacity) {
        uint32_t capacity = self->text_capacity ? self->text_capacity * 2 : 1024;
        Text *texts = PyMem_Realloc(self->texts, (size_t)capacity * sizeof(Text));
        if (texts == NULL) {
            Py_DECREF(text->mnemonic);
            Py_DECREF(text->token);
            Py_DECREF(text->address_immediates);
            Py_DECREF(text->large_immediates);
            Py_XDECREF(text->op_str);
            PyErr_NoMemory();
            return -1;
        }
        self->texts = texts;
        self->text_capacity = capacity;
    }
    text->is_mov = PyUnicode_CompareWithASCIIString(text->mnemonic, "mov") == 0;
    text->is_lea = PyUnicode_CompareWithASCIIString(text->mnemonic, "lea") == 0;
    text->is_endbr = PyUnicode_CompareWithASCIIString(text->mnemonic, "endbr64") == 0 ||
                     PyUnicode_CompareWithASCIIString(text->mnemonic, "endbr32") == 0;
    self->texts[self->text_count] = *text;
    return self->text_count++;
}

/* A text row for a new analysis (the 8-field _OperandAnalysis) and its op_str; -1 on error. */
static int64_t
text_from_analysis(TableObject *self, PyObject *op_str, PyObject *analysis)
{
    if (!PyTuple_Check(analysis) || PyTuple_GET_SIZE(analysis) != ANALYSIS_FIELDS) {
        PyErr_SetString(PyExc_TypeError, "analyse must return an 8-field tuple");
        return -1;
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
    text.op_str = op_str;
    text.printed_target = op_str == NULL;
    Py_INCREF(text.mnemonic);
    Py_INCREF(text.token);
    Py_INCREF(text.address_immediates);
    Py_INCREF(text.large_immediates);
    Py_XINCREF(text.op_str);
    return text_append(self, &text);
}


#include "_native_analysis.h"

/* Decodes a window at ``start`` (not in the table; in an executable segment) into new rows,
 * stopping at the first instruction that the table already holds: from there on the bytes are
 * in sync with what is cached. The row of ``start``, -2 when nothing decodes there, or -1 with
 * an error. */
static int64_t
table_decode_window(TableObject *self, uint64_t start)
{
    if (self->analyse == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the instruction table was cleared");
        return -1;
    }
    Py_ssize_t segment = table_segment(self, start);
    if (segment < 0 || !self->segment_executable[segment]) {
        return -2;
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
    int64_t start_row = -2;
    while (!failed &&
           iter_function(self->handle, &cursor, &remaining, &next_address, insn_buffer)) {
        decoded_any = 1;
        const char *insn = (const char *)insn_buffer;
        uint64_t insn_address;
        uint16_t insn_size;
        memcpy(&insn_address, insn + address_offset, sizeof insn_address);
        memcpy(&insn_size, insn + size_offset, sizeof insn_size);
        if (table_find(self, insn_address) >= 0) {
            break;
        }
        const char *mnemonic_text = insn + mnemonic_offset;
        const char *op_str_text = insn + op_str_offset;
        size_t mnemonic_length, op_str_length;
        uint64_t hash = field_hash(mnemonic_text, (size_t)mnemonic_capacity,
                                   0xcbf29ce484222325ULL, &mnemonic_length);
        hash = field_hash(op_str_text, (size_t)op_str_capacity, hash, &op_str_length);
        MemoEntry *known =
            memo_slot(&self->memo, hash, mnemonic_text, mnemonic_length, op_str_text, op_str_length);
        int64_t text = known->text != NULL ? (int64_t)known->value : -1;
        uint64_t direct = 0;
        int is_direct = 0;
        if (text < 0) {
            /* The mnemonic's str (interned, borrowed from the table) and its kind, made once. */
            int64_t name = names_index(&self->names, mnemonic_text, mnemonic_length);
            PyObject *mnemonic = name >= 0 ? self->names.objects[name] : NULL;
            int kind = name >= 0 ? self->names.kinds[name] : -1;
            if (kind == KIND_UNKNOWN) {
                kind = classify_mnemonic(self, mnemonic_text, mnemonic_length, mnemonic);
                if (kind != -1) {
                    self->names.kinds[name] = (int8_t)kind;
                }
            }
            PyObject *op_str = NULL, *analysis = NULL;
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
                                              mnemonic_length, "", 0, (uint32_t)text) == NULL) {
                        text = -1;
                    }
                }
                is_direct = 1;
            }
            int analysed = 0;
            if (!is_direct && kind != -1) {
                if (!text_is_ascii(op_str_text, op_str_length)) {
                    op_str = text_field(op_str_text, op_str_length); /* raises as Python does */
                } else if (kind >= 0) {
                    Text fresh;
                    analysed = analyse_in_c(self, kind, mnemonic, mnemonic_text,
                                            mnemonic_length, op_str_text, op_str_length, &fresh);
                    if (analysed > 0) {
                        text = text_append(self, &fresh);
                        const char *stored =
                            text < 0 ? NULL
                                     : memo_add(&self->memo, hash, mnemonic_text, mnemonic_length,
                                                op_str_text, op_str_length, (uint32_t)text);
                        if (stored == NULL) {
                            text = -1;
                        } else {
                            self->texts[text].op_str_text = stored + mnemonic_length + 1;
                            self->texts[text].op_str_length = (uint16_t)op_str_length;
                        }
                    }
                }
                if (analysed == 0 && op_str == NULL && !PyErr_Occurred()) {
                    op_str = text_field(op_str_text, op_str_length);
                }
            }
            /* Everything the compiled analysis leaves (kind -2, or 0 from analyse_in_c) goes to
             * the Python analysis and its caches. */
            PyObject *key = op_str != NULL && analysed == 0 ? PyTuple_Pack(2, mnemonic, op_str)
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
                                          op_str_text, op_str_length, (uint32_t)text) == NULL) {
                    text = -1;
                }
                Py_DECREF(analysis);
            }
            Py_XDECREF(key);
            Py_XDECREF(op_str);
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
        if (insn_address == start) {
            start_row = row;
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
    return failed ? -1 : start_row;
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
    row = table_decode_window(self, address);
    if (row != -2) {
        return row;
    }
    row = table_append(self, address); /* nothing decodes there */
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

/* The op_str of a text that is not a direct branch (borrowed), made on first use; NULL with
 * an error. */
static PyObject *
text_op_str(Text *text)
{
    if (text->op_str == NULL) {
        text->op_str = text_field(text->op_str_text, text->op_str_length);
    }
    return text->op_str;
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
    Text *text = &self->texts[record->text];
    PyObject *values[INSTRUCTION_FIELDS] = {NULL};
    values[0] = u64_object(record->address);
    values[1] = PyLong_FromLong(record->size);
    values[2] = text->mnemonic;
    Py_INCREF(values[2]);
    if (!text->printed_target) {
        values[3] = Py_XNewRef(text_op_str(text));
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
    self->slot_capacity = 1024; /* few rows are outside executable code */
    self->slot_shift = 64 - 10;
    self->last_segment = -1;
    self->slots = PyMem_Calloc(self->slot_capacity, sizeof(AddressSlot));
    if (self->no_values == NULL || self->owner_indexes == NULL || !self->segment_starts || !self->segment_lengths ||
        !self->segment_executable || !self->segment_data || !self->slots ||
        memo_init(&self->memo) < 0 || memo_init(&self->branch_memo) < 0 ||
        names_init(&self->names) < 0 ||
        class_map_init(&self->register_class_map, register_classes) < 0 ||
        class_map_init(&self->memory_size_map, memory_sizes) < 0) {
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
    self->granules = PyMem_Calloc((size_t)count + 1, sizeof(uint32_t *));
    self->start_bits = PyMem_Calloc((size_t)count + 1, sizeof(uint8_t *));
    if (self->granules == NULL || self->start_bits == NULL) {
        PyErr_NoMemory();
        Py_DECREF(self);
        return NULL;
    }
    self->disjoint_segments = 1;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t length = self->segment_lengths[i];
        if (i > 0 && self->segment_starts[i] - self->segment_starts[i - 1] <
                         self->segment_lengths[i - 1]) {
            self->disjoint_segments = 0;
        }
        if (self->segment_executable[i] && length > 0) {
            size_t granules = (size_t)((length - 1) >> CODE_GRANULE_BITS) + 1;
            self->granules[i] = PyMem_Calloc(granules, sizeof(uint32_t));
            if (self->granules[i] == NULL) {
                PyErr_NoMemory();
                Py_DECREF(self);
                return NULL;
            }
            self->block_limit += granules;
        }
    }
    size_t code_bytes = self->block_limit * CODE_GRANULE;
    size_t rows = code_bytes / CODE_BYTES_PER_ROW, texts = code_bytes / CODE_BYTES_PER_TEXT;
    rows = rows < RESERVED_ROWS_LIMIT ? rows : RESERVED_ROWS_LIMIT;
    texts = texts < RESERVED_TEXTS_LIMIT ? texts : RESERVED_TEXTS_LIMIT;
    if (rows > 4096) {
        self->records = PyMem_Malloc(rows * sizeof(Record));
        self->capacity = (uint32_t)rows;
    }
    if (texts > 1024) {
        self->texts = PyMem_Malloc(texts * sizeof(Text));
        self->text_capacity = (uint32_t)texts;
    }
    if ((self->capacity && self->records == NULL) || (self->text_capacity && self->texts == NULL)) {
        PyErr_NoMemory();
        Py_DECREF(self);
        return NULL;
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
    for (Py_ssize_t i = 0; self->granules != NULL && i < self->segment_count; i++) {
        PyMem_Free(self->granules[i]);
    }
    for (Py_ssize_t i = 0; self->start_bits != NULL && i < self->segment_count; i++) {
        PyMem_Free(self->start_bits[i]);
    }
    PyMem_Free(self->granules);
    PyMem_Free(self->start_bits);
    for (Py_ssize_t i = 0; self->cover_maps != NULL && i < self->cover_count; i++) {
        PyMem_Free(self->cover_maps[i]);
    }
    PyMem_Free(self->cover_maps);
    PyMem_Free(self->cover_bases);
    PyMem_Free(self->cover_lengths);
    PyMem_Free(self->cells);
    PyMem_Free(self->slots);
    PyMem_Free(self->owner_starts);
    Py_XDECREF(self->owner_indexes);
    memo_clear(&self->memo);
    memo_clear(&self->branch_memo);
    names_clear(&self->names);
    address_map_clear(&self->thunks);
    class_map_clear(&self->register_class_map);
    class_map_clear(&self->memory_size_map);
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

/* The memory operand's address of a ``jmp [mem]`` at ``address`` (after an endbr64/endbr32)
 * into ``*slot``: 1, 0 when there is none, -1 with an error. */
static int
table_slot_of(TableObject *self, uint64_t address, uint64_t *slot)
{
    int64_t row = table_decode(self, address);
    if (row == -1) {
        return -1;
    }
    if (!(self->records[row].flags & FLAG_INVALID) &&
        self->texts[self->records[row].text].is_endbr) {
        uint64_t next = address + self->records[row].size;
        row = next > address ? table_decode(self, next) : -2;
        if (row == -1) {
            return -1;
        }
    }
    if (row < 0 || self->records[row].flags & FLAG_INVALID) {
        return 0;
    }
    const Record *record = &self->records[row];
    if (self->texts[record->text].kind != KIND_JUMP || !(record->flags & FLAG_MEMORY)) {
        return 0;
    }
    *slot = record_memory(self, record);
    return 1;
}

/* FunctionRecovery.import_thunk for a valid address: "lib!name" when ``address`` is an import
 * slot or an import stub (``jmp [slot]``), else None; remembered per address. It is asked for
 * every call target and proposed start (~2 per function), so explore asks it here instead of
 * calling back into Python. A new reference, or NULL with an error. */
static PyObject *
table_thunk(TableObject *self, uint64_t address, PyObject *import_slots)
{
    PyObject *known = address_map_get(&self->thunks, address);
    if (known != NULL) {
        return Py_NewRef(known);
    }
    PyObject *key = u64_object(address);
    PyObject *name = key ? PyDict_GetItemWithError(import_slots, key) : NULL; /* borrowed */
    Py_XDECREF(key);
    if (PyErr_Occurred()) {
        return NULL;
    }
    uint64_t slot;
    int found = name == NULL || name == Py_None ? table_slot_of(self, address, &slot) : 0;
    if (found < 0) {
        return NULL;
    }
    if (found) {
        key = u64_object(slot);
        name = key ? PyDict_GetItemWithError(import_slots, key) : NULL;
        Py_XDECREF(key);
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    if (name == NULL) {
        name = Py_None;
    }
    return address_map_put(&self->thunks, address, name) < 0 ? NULL : Py_NewRef(name);
}

/* import_thunk(address, import_slots) -> "lib!name" or None (see table_thunk). */
static PyObject *
table_import_thunk(TableObject *self, PyObject *args)
{
    PyObject *address_object, *import_slots;
    if (!PyArg_ParseTuple(args, "OO!", &address_object, &PyDict_Type, &import_slots)) {
        return NULL;
    }
    uint64_t address;
    int valid = address_value(address_object, &address);
    if (valid < 0) {
        return NULL;
    }
    if (valid) {
        return table_thunk(self, address, import_slots);
    }
    /* Past 2**64 or negative: no stub there, only the slots themselves could name it. */
    PyObject *name = PyDict_GetItemWithError(import_slots, address_object);
    if (name == NULL && PyErr_Occurred()) {
        return NULL;
    }
    return Py_NewRef(name != NULL ? name : Py_None);
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
#include "_native_coverage.h"
#include "_native_explore.h"

static PyMethodDef table_methods[] = {
    {"decode", (PyCFunction)table_decode_method, METH_O,
     "decode(address) -> Instruction | None (decoding a window when not cached)"},
    {"import_thunk", (PyCFunction)table_import_thunk, METH_VARARGS,
     "import_thunk(address, import_slots) -> import name of a slot or stub there, or None"},
    {"cover_span", (PyCFunction)table_cover_span, METH_VARARGS,
     "cover_span(address, size): mark one instruction's bytes covered"},
    {"covered", (PyCFunction)table_covered, METH_O,
     "covered(address) -> whether a recovered function's instruction covers the byte"},
    {"gaps", (PyCFunction)table_gaps, METH_NOARGS,
     "gaps() -> [(low, high)]: the uncovered ranges of the executable segments"},
    {"mark_start", (PyCFunction)table_mark_start, METH_VARARGS,
     "mark_start(address, known): a function start explore must not flow into (or not)"},
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


#include "_native_minhash.h"
#include "_native_strings.h"

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(cs_disasm, cs_free, cs_errno, cs_malloc, cs_disasm_iter, insn_size, "
     "address_offset, size_offset, "
     "mnemonic_offset, mnemonic_size, op_str_offset, op_str_size)"},
    {"starts_containing", starts_containing, METH_VARARGS,
     "starts_containing(bodies, address) -> starts whose body holds the address"},
    {"minhash_ids", minhash_ids, METH_VARARGS,
     "minhash_ids(ids, lengths, sizes, multiplier, mix, a, b) -> uint32 signatures (bytes)"},
    {"uint32_rows", uint32_rows, METH_VARARGS,
     "uint32_rows(data, width) -> [(value, ...)]: native uint32 values, width per tuple"},
    {"byte_counts", byte_counts, METH_VARARGS,
     "byte_counts(data) -> 256 native int64 counts of each byte value (bytes)"},
    {"string_runs", string_runs, METH_VARARGS,
     "string_runs(data, min_length, max_length, limit) -> [(offset, wide, text)] by offset"},
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
