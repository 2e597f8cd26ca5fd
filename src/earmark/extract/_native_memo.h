/* Per-sample text memo of the instruction table. Part of _native.c (one compilation unit, included once; split so each
 * part reads in one sitting). */

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
