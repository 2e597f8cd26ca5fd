/* MinHash signatures from token ids. Part of _native.c (one compilation unit, included once; split so each
 * part reads in one sitting). */

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
