/* String runs of a sample's bytes. Part of _native.c (one compilation unit, included once; split
 * so each part reads in one sitting). */

/* --- String runs -----------------------------------------------------------------------------
 * earmark.extract.strings' two regex scans (printable ASCII runs; UTF-16LE runs of a printable
 * ASCII character and a zero byte) and their merge by offset, in one loop per encoding. The
 * UTF-16 regex tried its pair at every byte and cost the PE bench (a) KB ~0.38 CPU s for 1,900
 * runs, the ASCII one ~0.3 s; here both take a few ms. The regex scans stay the reference (the
 * tests compare the two on real files and on made-up bytes).
 *
 * A UTF-16LE run is pairs at p, p+2, ...; runs of the two byte phases never overlap (a byte
 * would have to be printable and zero at once), so each phase is followed on its own and a run
 * is complete at the first pair of its phase that fails, which keeps them in offset order. */

typedef struct {
    Py_ssize_t offset, length; /* length in characters (a UTF-16 character is two bytes) */
} StringRun;

typedef struct {
    StringRun *runs;
    Py_ssize_t count, limit;
} StringRuns;

/* [\x20-\x7e\t]: what `strings` prints (strings.py's _PRINTABLE). */
static inline int
printable_byte(uint8_t byte)
{
    return (byte >= 0x20 && byte <= 0x7e) || byte == '\t';
}

/* Appends a run; 1 when the list is full (the scan stops), 0 otherwise. */
static inline int
string_runs_add(StringRuns *runs, Py_ssize_t offset, Py_ssize_t length)
{
    runs->runs[runs->count].offset = offset;
    runs->runs[runs->count].length = length;
    runs->count++;
    return runs->count >= runs->limit;
}

static void
scan_ascii_runs(const uint8_t *data, Py_ssize_t size, Py_ssize_t min_length, StringRuns *runs)
{
    Py_ssize_t start = -1;
    for (Py_ssize_t i = 0; i < size; i++) {
        if (printable_byte(data[i])) {
            if (start < 0) {
                start = i;
            }
        } else if (start >= 0) {
            if (i - start >= min_length && string_runs_add(runs, start, i - start)) {
                return;
            }
            start = -1;
        }
    }
    if (start >= 0 && size - start >= min_length) {
        string_runs_add(runs, start, size - start);
    }
}

static void
scan_utf16_runs(const uint8_t *data, Py_ssize_t size, Py_ssize_t min_length, StringRuns *runs)
{
    Py_ssize_t start[2] = {0, 0}, pairs[2] = {0, 0};
    for (Py_ssize_t i = 0; i + 1 < size; i++) {
        int phase = (int)(i & 1);
        if (printable_byte(data[i]) && data[i + 1] == 0) {
            if (pairs[phase]++ == 0) {
                start[phase] = i;
            }
        } else if (pairs[phase]) {
            if (pairs[phase] >= min_length && string_runs_add(runs, start[phase], pairs[phase])) {
                return;
            }
            pairs[phase] = 0;
        }
    }
    /* Runs still open at the end, the earlier first. */
    int first = pairs[0] && pairs[1] && start[1] < start[0] ? 1 : 0;
    for (int k = 0; k < 2; k++) {
        int phase = k == 0 ? first : 1 - first;
        if (pairs[phase] >= min_length && string_runs_add(runs, start[phase], pairs[phase])) {
            return;
        }
    }
}

/* The text of a run, cut to max_length characters: ASCII bytes, or every other byte of UTF-16LE
 * pairs (all below 0x80, so both are ASCII strings, equal to what .decode gives). */
static PyObject *
string_run_text(const uint8_t *data, const StringRun *run, Py_ssize_t max_length, int wide)
{
    Py_ssize_t length = run->length < max_length ? run->length : max_length;
    PyObject *text = PyUnicode_New(length, 127);
    if (text == NULL) {
        return NULL;
    }
    Py_UCS1 *characters = PyUnicode_1BYTE_DATA(text);
    const uint8_t *source = data + run->offset;
    if (wide) {
        for (Py_ssize_t k = 0; k < length; k++) {
            characters[k] = source[2 * k];
        }
    } else {
        memcpy(characters, source, (size_t)length);
    }
    return text;
}

/* string_runs(data, min_length, max_length, limit) -> [(offset, wide, text)]
 * The first ``limit`` runs of at least min_length characters by offset, ASCII and UTF-16LE
 * merged (wide: True for UTF-16LE), each text cut to max_length characters. */
static PyObject *
string_runs(PyObject *module, PyObject *args)
{
    Py_buffer buffer;
    Py_ssize_t min_length, max_length, limit;
    if (!PyArg_ParseTuple(args, "y*nnn", &buffer, &min_length, &max_length, &limit)) {
        return NULL;
    }
    if (min_length < 1 || max_length < 0 || limit < 0) {
        PyBuffer_Release(&buffer);
        PyErr_SetString(PyExc_ValueError, "min_length must be positive, the others not negative");
        return NULL;
    }
    PyObject *result = NULL;
    /* Disjoint runs of min_length bytes or more: never more than len / min_length of them. */
    Py_ssize_t capacity = buffer.len / min_length + 1;
    capacity = capacity < limit ? capacity : limit;
    StringRuns narrow = {NULL, 0, capacity}, wide = {NULL, 0, capacity};
    if (capacity > 0) {
        narrow.runs = PyMem_Malloc((size_t)capacity * sizeof(StringRun));
        wide.runs = PyMem_Malloc((size_t)capacity * sizeof(StringRun));
        if (narrow.runs == NULL || wide.runs == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        const uint8_t *data = buffer.buf;
        Py_BEGIN_ALLOW_THREADS
        scan_ascii_runs(data, buffer.len, min_length, &narrow);
        scan_utf16_runs(data, buffer.len, min_length, &wide);
        Py_END_ALLOW_THREADS
    }
    Py_ssize_t total = narrow.count + wide.count < limit ? narrow.count + wide.count : limit;
    result = PyList_New(total);
    Py_ssize_t next_narrow = 0, next_wide = 0;
    for (Py_ssize_t k = 0; result != NULL && k < total; k++) {
        /* No two runs start at one offset: a UTF-16 run's second byte is zero. */
        int take_wide = next_narrow >= narrow.count ||
                        (next_wide < wide.count &&
                         wide.runs[next_wide].offset < narrow.runs[next_narrow].offset);
        const StringRun *run = take_wide ? &wide.runs[next_wide++] : &narrow.runs[next_narrow++];
        PyObject *text = string_run_text(buffer.buf, run, max_length, take_wide);
        PyObject *entry = text ? Py_BuildValue("(nON)", run->offset, take_wide ? Py_True : Py_False,
                                               text)
                               : NULL;
        if (entry == NULL) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, k, entry);
    }
done:
    PyMem_Free(narrow.runs);
    PyMem_Free(wide.runs);
    PyBuffer_Release(&buffer);
    return result;
}
