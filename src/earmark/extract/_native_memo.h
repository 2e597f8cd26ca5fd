/* Per-sample text memo of the instruction table. Part of _native.c (one compilation unit, included once; split so each
 * part reads in one sitting). */

/* --- text memo: instruction text (as capstone wrote it) -> row of the texts array ----------
 * A hit costs a hash over the text and one compare, instead of two new str objects, a key
 * tuple and up to two dict lookups with fresh string hashes. */

typedef struct {
    uint64_t hash;
    char *text; /* mnemonic, NUL, op_str, NUL (in the arena); NULL for an empty slot */
    uint16_t mnemonic_length, op_str_length; /* cs_insn fields hold 32 and 160 bytes */
    uint32_t value;
} MemoEntry;

/* The texts' bytes are carved from chunks of MEMO_CHUNK_BYTES (each starting with a pointer to
 * the one before), not one allocation each: a new text is ~1 in 4 decoded instructions. */
#define MEMO_CHUNK_BYTES 65536

typedef struct {
    MemoEntry *entries;
    size_t capacity; /* a power of two */
    size_t used;
    char *chunk; /* the newest chunk, or NULL */
    size_t chunk_used;
} Memo;

static int
memo_init(Memo *memo)
{
    memo->capacity = 1024;
    memo->used = 0;
    memo->chunk = NULL;
    memo->chunk_used = 0;
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
    while (memo->chunk != NULL) {
        char *previous;
        memcpy(&previous, memo->chunk, sizeof previous);
        PyMem_Free(memo->chunk);
        memo->chunk = previous;
    }
    PyMem_Free(memo->entries);
    memo->entries = NULL;
}

/* Room for ``length`` bytes in the arena, or NULL with MemoryError. */
static char *
memo_bytes(Memo *memo, size_t length)
{
    if (memo->chunk == NULL || memo->chunk_used + length > MEMO_CHUNK_BYTES) {
        size_t size = sizeof(char *) + length > MEMO_CHUNK_BYTES ? sizeof(char *) + length
                                                                 : MEMO_CHUNK_BYTES;
        char *chunk = PyMem_Malloc(size);
        if (chunk == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        memcpy(chunk, &memo->chunk, sizeof memo->chunk);
        memo->chunk = chunk;
        memo->chunk_used = sizeof(char *);
    }
    char *bytes = memo->chunk + memo->chunk_used;
    memo->chunk_used += length;
    return bytes;
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

/* Remembers value for a text not yet present: its stored copy (mnemonic, NUL, op_str, NUL;
 * kept as long as the memo), or NULL with MemoryError. */
static const char *
memo_add(Memo *memo, uint64_t hash, const char *mnemonic, size_t mnemonic_length,
         const char *op_str, size_t op_str_length, uint32_t value)
{
    if (2 * (memo->used + 1) > memo->capacity) { /* keep the table at most half full */
        size_t capacity = memo->capacity * 2;
        MemoEntry *entries = PyMem_Calloc(capacity, sizeof(MemoEntry));
        if (entries == NULL) {
            PyErr_NoMemory();
            return NULL;
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
    char *text = memo_bytes(memo, mnemonic_length + op_str_length + 2);
    if (text == NULL) {
        return NULL;
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
    return text;
}

/* --- word-at-a-time hashing of cs_insn text fields ----------------------------------------- */

static inline uint64_t
mix_word(uint64_t hash, uint64_t word)
{
    hash = (hash ^ word) * 0x9E3779B97F4A7C15ULL;
    return hash ^ (hash >> 32); /* the memo indexes by the low bits */
}

/* The length of the NUL-terminated text in a cs_insn field of ``capacity`` bytes (strnlen)
 * and ``hash`` mixed with it, in one pass of 8-byte words: capstone leaves no length, and the
 * separate strnlen calls and byte-wise hash cost more than the memo probe they lead to. */
static inline uint64_t
field_hash(const char *field, size_t capacity, uint64_t hash, size_t *length)
{
    size_t i = 0;
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    for (; i + 8 <= capacity; i += 8) {
        uint64_t word;
        memcpy(&word, field + i, sizeof word);
        /* Flags the first NUL byte exactly (a false flag only ever sits above a true one). */
        uint64_t zero = (word - 0x0101010101010101ULL) & ~word & 0x8080808080808080ULL;
        if (zero) {
            unsigned bytes = (unsigned)__builtin_ctzll(zero) >> 3;
            *length = i + bytes;
            /* The bytes after the NUL are left over from earlier instructions. */
            return mix_word(hash, bytes ? word & (~0ULL >> (64 - 8 * bytes)) : 0);
        }
        hash = mix_word(hash, word);
    }
#endif
    for (; i < capacity && field[i]; i++) {
        hash = mix_word(hash, (unsigned char)field[i]);
    }
    *length = i;
    return mix_word(hash, 0);
}

/* --- ClassMap: a C copy of one of disasm.py's str -> str dicts ------------------------------
 * REGISTER_CLASSES and _MEMORY_SIZES are read for nearly every operand of a new text; as dict
 * lookups each cost a fresh str, its hash and a lookup. Copied once per table (a few hundred
 * entries), a lookup is a hash over a few bytes and a compare. Entries that could never match
 * an operand (a key or value not an ASCII str) are left out, so the answers are the dict's. */

typedef struct {
    uint64_t hash;
    char *key, *value; /* NUL-terminated; key NULL for an empty entry */
    size_t key_length, value_length;
} ClassEntry;

typedef struct {
    ClassEntry *entries;
    size_t capacity; /* a power of two, at least twice the entries */
} ClassMap;

static inline uint64_t
bytes_hash(const char *text, size_t length)
{
    uint64_t hash = 0xcbf29ce484222325ULL; /* FNV-1a */
    for (size_t i = 0; i < length; i++) {
        hash = (hash ^ (unsigned char)text[i]) * 0x100000001b3ULL;
    }
    return hash ^ (hash >> 32);
}

static void
class_map_clear(ClassMap *map)
{
    for (size_t i = 0; map->entries != NULL && i < map->capacity; i++) {
        PyMem_Free(map->entries[i].key);
        PyMem_Free(map->entries[i].value);
    }
    PyMem_Free(map->entries);
    map->entries = NULL;
    map->capacity = 0;
}

/* Copies ``dict``; 0, or -1 with an error. */
static int
class_map_init(ClassMap *map, PyObject *dict)
{
    map->capacity = 16;
    while (map->capacity < 2 * (size_t)PyDict_GET_SIZE(dict) + 2) {
        map->capacity *= 2;
    }
    map->entries = PyMem_Calloc(map->capacity, sizeof(ClassEntry));
    if (map->entries == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t position = 0;
    PyObject *key, *value;
    while (PyDict_Next(dict, &position, &key, &value)) {
        if (!PyUnicode_Check(key) || !PyUnicode_Check(value) || !PyUnicode_IS_ASCII(key) ||
            !PyUnicode_IS_ASCII(value)) {
            continue;
        }
        Py_ssize_t key_length, value_length;
        const char *key_text = PyUnicode_AsUTF8AndSize(key, &key_length);
        const char *value_text = key_text ? PyUnicode_AsUTF8AndSize(value, &value_length) : NULL;
        if (value_text == NULL) {
            return -1;
        }
        uint64_t hash = bytes_hash(key_text, (size_t)key_length);
        size_t i = (size_t)hash & (map->capacity - 1);
        while (map->entries[i].key != NULL) { /* dict keys are distinct */
            i = (i + 1) & (map->capacity - 1);
        }
        ClassEntry *entry = &map->entries[i];
        entry->key = PyMem_Malloc((size_t)key_length + 1);
        entry->value = PyMem_Malloc((size_t)value_length + 1);
        if (entry->key == NULL || entry->value == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(entry->key, key_text, (size_t)key_length + 1);
        memcpy(entry->value, value_text, (size_t)value_length + 1);
        entry->hash = hash;
        entry->key_length = (size_t)key_length;
        entry->value_length = (size_t)value_length;
    }
    return 0;
}

/* The value for the key made of ``text``, or NULL. */
static const char *
class_map_get(const ClassMap *map, const char *text, size_t length, Py_ssize_t *size)
{
    uint64_t hash = bytes_hash(text, length);
    for (size_t i = (size_t)hash & (map->capacity - 1);; i = (i + 1) & (map->capacity - 1)) {
        const ClassEntry *entry = &map->entries[i];
        if (entry->key == NULL) {
            return NULL;
        }
        if (entry->hash == hash && entry->key_length == length &&
            memcmp(entry->key, text, length) == 0) {
            *size = (Py_ssize_t)entry->value_length;
            return entry->value;
        }
    }
}

/* --- Names: the str objects of mnemonics and tokens by their text ---------------------------
 * A few hundred mnemonics and a few thousand tokens spell the ~10k new texts of a sample;
 * each is made (and interned) once per table, then found by its bytes. */

#define KIND_UNKNOWN (-3) /* classify_mnemonic not asked yet */

typedef struct {
    Memo memo;          /* text -> index */
    PyObject **objects; /* owned */
    int8_t *kinds;      /* classify_mnemonic's answer when the text is a mnemonic */
    uint32_t count, capacity;
} Names;

static int
names_init(Names *names)
{
    names->objects = NULL;
    names->kinds = NULL;
    names->count = names->capacity = 0;
    return memo_init(&names->memo);
}

static void
names_clear(Names *names)
{
    for (uint32_t i = 0; i < names->count; i++) {
        Py_DECREF(names->objects[i]);
    }
    PyMem_Free(names->objects);
    PyMem_Free(names->kinds);
    names->objects = NULL;
    names->kinds = NULL;
    names->count = 0;
    memo_clear(&names->memo);
}

/* Index of the interned str of ``text``, made when new; -1 with an error (UnicodeDecodeError
 * for a byte past ASCII, as bytes.decode("ascii") raises on the Python path). */
static int64_t
names_index(Names *names, const char *text, size_t length)
{
    uint64_t hash = bytes_hash(text, length);
    MemoEntry *entry = memo_slot(&names->memo, hash, text, length, "", 0);
    if (entry->text != NULL) {
        return entry->value;
    }
    if (names->count == names->capacity) {
        uint32_t capacity = names->capacity ? names->capacity * 2 : 256;
        PyObject **objects = PyMem_Realloc(names->objects, capacity * sizeof(PyObject *));
        if (objects != NULL) {
            names->objects = objects;
        }
        int8_t *kinds = objects ? PyMem_Realloc(names->kinds, capacity) : NULL;
        if (kinds == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        names->kinds = kinds;
        names->capacity = capacity;
    }
    PyObject *object = PyUnicode_DecodeASCII(text, (Py_ssize_t)length, "strict");
    if (object == NULL) {
        return -1;
    }
    PyUnicode_InternInPlace(&object);
    if (memo_add(&names->memo, hash, text, length, "", 0, names->count) == NULL) {
        Py_DECREF(object);
        return -1;
    }
    names->objects[names->count] = object;
    names->kinds[names->count] = KIND_UNKNOWN;
    return names->count++;
}

/* --- AddressMap: address -> owned object (open addressing, at most half full) ---------------- */

typedef struct {
    uint64_t address;
    PyObject *value; /* owned; NULL for an empty entry */
} AddressEntry;

typedef struct {
    AddressEntry *entries;
    size_t capacity, used; /* capacity: 0 or a power of two */
} AddressMap;

static inline size_t
address_map_start(uint64_t address, size_t capacity)
{
    return (size_t)((address * 0x9E3779B97F4A7C15ULL) >> 32) & (capacity - 1);
}

/* The value at ``address`` (borrowed), or NULL. */
static PyObject *
address_map_get(const AddressMap *map, uint64_t address)
{
    if (map->capacity == 0) {
        return NULL;
    }
    for (size_t i = address_map_start(address, map->capacity);; i = (i + 1) & (map->capacity - 1)) {
        const AddressEntry *entry = &map->entries[i];
        if (entry->value == NULL || entry->address == address) {
            return entry->value;
        }
    }
}

/* Stores a new reference to ``value`` at ``address`` (not present); 0, or -1 with an error. */
static int
address_map_put(AddressMap *map, uint64_t address, PyObject *value)
{
    if (2 * (map->used + 1) > map->capacity) {
        size_t capacity = map->capacity ? map->capacity * 2 : 1024;
        AddressEntry *entries = PyMem_Calloc(capacity, sizeof(AddressEntry));
        if (entries == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (size_t i = 0; i < map->capacity; i++) {
            if (map->entries[i].value != NULL) {
                size_t j = address_map_start(map->entries[i].address, capacity);
                while (entries[j].value != NULL) {
                    j = (j + 1) & (capacity - 1);
                }
                entries[j] = map->entries[i];
            }
        }
        PyMem_Free(map->entries);
        map->entries = entries;
        map->capacity = capacity;
    }
    size_t i = address_map_start(address, map->capacity);
    while (map->entries[i].value != NULL) {
        i = (i + 1) & (map->capacity - 1);
    }
    map->entries[i].address = address;
    map->entries[i].value = Py_NewRef(value);
    map->used++;
    return 0;
}

static void
address_map_clear(AddressMap *map)
{
    for (size_t i = 0; i < map->capacity; i++) {
        Py_XDECREF(map->entries[i].value);
    }
    PyMem_Free(map->entries);
    map->entries = NULL;
    map->capacity = map->used = 0;
}
