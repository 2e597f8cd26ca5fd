/* MinHash signatures from token ids. Part of _native.c (one compilation unit, included once; split so each
 * part reads in one sitting). */

/* --- MinHash --------------------------------------------------------------------------------
 * minhash.id_minhash_signatures in one pass per function: every n-gram shingle of its token
 * ids, then for each permutation the minimum of ((a * x + b) mod 2**64) >> 32. Repeated
 * shingles are dropped first through a small open-addressing set (a minimum does not change
 * without them): 7.3M of the PE bench (a) KB's 16.8M shingles are distinct, and a probe costs
 * less than a 64-permutation pass (a qsort per function made an earlier version as slow as
 * numpy). Same integer arithmetic as the numpy reference, so the same signatures; the tests
 * compare the two. */

#define MAX_PERMUTATIONS 256

/* The permutations' minima over a run of shingles. ((a * x + b) mod 2**64) >> 32 for a 32-bit x
 * is computed in 32-bit halves, hi32(x * lo32(a) + lo32(b)) + x * hi32(a) + hi32(b) mod 2**32
 * (the 64-bit sum cannot overflow: (2**32 - 1)**2 + 2**32 - 1 < 2**64), the same value; in this
 * form the loop over the permutations vectorises with 32-bit lanes, and where the compiler
 * supports function clones an AVX2 copy is chosen at load time on CPUs that have it: PE bench
 * (a) KB, 101 samples, 0.62 -> 0.20 CPU s (AVX2 copy). */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define MINHASH_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef MINHASH_CLONES
#define MINHASH_CLONES
#endif

MINHASH_CLONES static void
minhash_minima(uint32_t *restrict minima, const uint32_t *restrict shingles, Py_ssize_t count,
               const uint32_t *restrict coefficients, Py_ssize_t permutations)
{
    /* coefficients: lo32(a), hi32(a), lo32(b), hi32(b), each ``permutations`` long. */
    const uint32_t *a_low = coefficients, *a_high = coefficients + permutations;
    const uint32_t *b_low = coefficients + 2 * permutations;
    const uint32_t *b_high = coefficients + 3 * permutations;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t shingle = shingles[i];
        for (Py_ssize_t j = 0; j < permutations; j++) {
            uint64_t low = (uint64_t)shingle * a_low[j] + b_low[j];
            uint32_t value = (uint32_t)(low >> 32) + shingle * a_high[j] + b_high[j];
            minima[j] = value < minima[j] ? value : minima[j];
        }
    }
}

/* Moves the distinct values of shingles[0..count) to its front (order kept) and returns how
 * many there are. ``table`` holds 2 * count or more zeroed slots, a power of two (mask + 1),
 * and is zeroed again on return; a slot keeps value + 1, so 0 means empty. The shingles are
 * already mixed hashes, so their low bits index the table directly. */
static Py_ssize_t
distinct_shingles(uint32_t *shingles, Py_ssize_t count, uint64_t *table, size_t mask)
{
    Py_ssize_t kept = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t key = (uint64_t)shingles[i] + 1;
        size_t slot = (size_t)shingles[i] & mask;
        while (table[slot] != 0 && table[slot] != key) {
            slot = (slot + 1) & mask;
        }
        if (table[slot] == 0) {
            table[slot] = key;
            shingles[kept++] = shingles[i];
        }
    }
    for (Py_ssize_t i = 0; i < kept; i++) {
        size_t slot = (size_t)shingles[i] & mask;
        while (table[slot] != (uint64_t)shingles[i] + 1) {
            slot = (slot + 1) & mask;
        }
        table[slot] = 0;
    }
    return kept;
}

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
    Py_ssize_t longest = 0;
    for (Py_ssize_t i = 0; result != NULL && i < streams; i++) {
        longest = length_values[i] > longest ? length_values[i] : longest;
    }
    /* One stream's shingles (at most its length per n-gram size) and the split coefficients. */
    uint32_t *shingles = NULL, *coefficients = NULL;
    uint64_t *table = NULL;
    size_t table_size = 16;
    while (result != NULL && table_size < 2 * ((size_t)longest * (size_t)size_count + 1)) {
        table_size *= 2;
    }
    if (result != NULL) {
        shingles = PyMem_Malloc(((size_t)longest * (size_t)size_count + 1) * sizeof(uint32_t));
        coefficients = PyMem_Malloc(((size_t)permutations * 4 + 1) * sizeof(uint32_t));
        table = PyMem_Calloc(table_size, sizeof(uint64_t));
        if (shingles == NULL || coefficients == NULL || table == NULL) {
            Py_CLEAR(result);
            PyErr_NoMemory();
        }
    }
    if (result != NULL) {
        for (Py_ssize_t j = 0; j < permutations; j++) {
            coefficients[j] = (uint32_t)a_values[j];
            coefficients[permutations + j] = (uint32_t)(a_values[j] >> 32);
            coefficients[2 * permutations + j] = (uint32_t)b_values[j];
            coefficients[3 * permutations + j] = (uint32_t)(b_values[j] >> 32);
        }
        uint32_t *out = (uint32_t *)PyBytes_AS_STRING(result);
        Py_ssize_t offset = 0;
        for (Py_ssize_t stream = 0; stream < streams; stream++) {
            Py_ssize_t length = length_values[stream], count = 0;
            const uint64_t *tokens = id_values + offset;
            for (Py_ssize_t k = 0; k < size_count; k++) {
                long size = size_values[k];
                for (Py_ssize_t p = 0; p + size <= length; p++) {
                    uint64_t folded = tokens[p] ^ (uint64_t)size;
                    for (long shift = 1; shift < size; shift++) {
                        folded = folded * multiplier ^ tokens[p + shift];
                    }
                    shingles[count++] = (uint32_t)((folded * mix) >> 32);
                }
            }
            uint32_t *minima = out + stream * permutations;
            for (Py_ssize_t j = 0; j < permutations; j++) {
                minima[j] = 0xFFFFFFFFu;
            }
            count = distinct_shingles(shingles, count, table, table_size - 1);
            minhash_minima(minima, shingles, count, coefficients, permutations);
            offset += length;
        }
    }
    PyMem_Free(shingles);
    PyMem_Free(coefficients);
    PyMem_Free(table);
    PyBuffer_Release(&ids);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return result;
}

/* uint32_rows(data, width) -> [(value, ...), ...]
 * The native-order uint32 values of ``data`` as tuples of ``width`` ints: how the signatures
 * of minhash_ids reach FunctionFeatures. numpy's tolist() and then tuple() of each row built
 * every signature twice (PE bench (a) KB, 39k functions, 2 signatures each: ~0.15 CPU s). */
static PyObject *
uint32_rows(PyObject *module, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "y*n", &data, &width)) {
        return NULL;
    }
    if (width <= 0 || data.len % (width * (Py_ssize_t)sizeof(uint32_t)) != 0) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "data is not whole rows of uint32 values");
        return NULL;
    }
    Py_ssize_t rows = data.len / (width * (Py_ssize_t)sizeof(uint32_t));
    const unsigned char *bytes = data.buf;
    PyObject *result = PyList_New(rows);
    for (Py_ssize_t row = 0; result != NULL && row < rows; row++) {
        PyObject *values = PyTuple_New(width);
        if (values == NULL) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, row, values);
        for (Py_ssize_t j = 0; j < width; j++) {
            uint32_t value;
            memcpy(&value, bytes + (row * width + j) * sizeof(uint32_t), sizeof value);
            PyObject *number = PyLong_FromUnsignedLong(value);
            if (number == NULL) {
                Py_CLEAR(result);
                break;
            }
            PyTuple_SET_ITEM(values, j, number);
        }
    }
    PyBuffer_Release(&data);
    return result;
}
