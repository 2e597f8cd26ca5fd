/* String runs and byte counts of a sample's bytes. Part of _native.c (one compilation unit, included once; split
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

/* Each scan alternates a loop over the bytes that cannot start a run and a loop over the run's
 * bytes, one test per byte in each; the earlier single loop per encoding also tested at every
 * byte whether a run was open and, for UTF-16, which byte phase it was in (PE bench (a) KB,
 * 20 MB: both scans 0.086 -> 0.064 CPU s). */
static void
scan_ascii_runs(const uint8_t *data, Py_ssize_t size, Py_ssize_t min_length, StringRuns *runs)
{
    Py_ssize_t i = 0;
    while (i < size) {
        while (i < size && !printable_byte(data[i])) {
            i++;
        }
        Py_ssize_t start = i;
        while (i < size && printable_byte(data[i])) {
            i++;
        }
        if (i > start && i - start >= min_length && string_runs_add(runs, start, i - start)) {
            return;
        }
    }
}

/* A printable ASCII character and a zero byte at data[i] (i + 1 < size). */
static inline int
utf16_pair(const uint8_t *data, Py_ssize_t i)
{
    return data[i + 1] == 0 && printable_byte(data[i]);
}

/* The runs of one byte phase (pairs at phase, phase + 2, ...), in offset order. */
static void
scan_utf16_phase(const uint8_t *data, Py_ssize_t size, Py_ssize_t min_length, Py_ssize_t phase,
                 StringRuns *runs)
{
    Py_ssize_t i = phase;
    while (i + 1 < size) {
        while (i + 1 < size && !utf16_pair(data, i)) {
            i += 2;
        }
        Py_ssize_t start = i;
        while (i + 1 < size && utf16_pair(data, i)) {
            i += 2;
        }
        Py_ssize_t pairs = (i - start) / 2;
        if (pairs > 0 && pairs >= min_length && string_runs_add(runs, start, pairs)) {
            return;
        }
    }
}

/* The runs of both phases, merged by offset into ``runs``: the first ``limit`` of the merge are
 * among the first ``limit`` of each phase. */
static void
scan_utf16_runs(const uint8_t *data, Py_ssize_t size, Py_ssize_t min_length, StringRuns *even,
                StringRuns *odd, StringRuns *runs)
{
    scan_utf16_phase(data, size, min_length, 0, even);
    scan_utf16_phase(data, size, min_length, 1, odd);
    Py_ssize_t next_even = 0, next_odd = 0;
    while (runs->count < runs->limit && (next_even < even->count || next_odd < odd->count)) {
        int take_odd = next_even >= even->count ||
                       (next_odd < odd->count &&
                        odd->runs[next_odd].offset < even->runs[next_even].offset);
        runs->runs[runs->count++] = take_odd ? odd->runs[next_odd++] : even->runs[next_even++];
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
    StringRuns even = {NULL, 0, capacity}, odd = {NULL, 0, capacity};
    if (capacity > 0) {
        narrow.runs = PyMem_Malloc((size_t)capacity * sizeof(StringRun));
        wide.runs = PyMem_Malloc((size_t)capacity * sizeof(StringRun));
        even.runs = PyMem_Malloc((size_t)capacity * sizeof(StringRun));
        odd.runs = PyMem_Malloc((size_t)capacity * sizeof(StringRun));
        if (narrow.runs == NULL || wide.runs == NULL || even.runs == NULL || odd.runs == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        const uint8_t *data = buffer.buf;
        Py_BEGIN_ALLOW_THREADS
        scan_ascii_runs(data, buffer.len, min_length, &narrow);
        scan_utf16_runs(data, buffer.len, min_length, &even, &odd, &wide);
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
    PyMem_Free(even.runs);
    PyMem_Free(odd.runs);
    PyBuffer_Release(&buffer);
    return result;
}

/* byte_counts(data) -> bytes: how often each byte value occurs, 256 native int64 values (what
 * numpy.bincount(..., minlength=256) gives for section entropy; numpy widened every byte to
 * an int64 first, ~0.04 CPU s for the 20 MB of the PE bench (a) KB). Four tables counted in
 * turn so that runs of one byte value do not wait on the previous increment of its counter. */
static PyObject *
byte_counts(PyObject *module, PyObject *args)
{
    Py_buffer buffer;
    if (!PyArg_ParseTuple(args, "y*", &buffer)) {
        return NULL;
    }
    PyObject *result = PyBytes_FromStringAndSize(NULL, 256 * sizeof(int64_t));
    if (result != NULL) {
        int64_t partial[4][256];
        memset(partial, 0, sizeof partial);
        const uint8_t *data = buffer.buf;
        Py_ssize_t size = buffer.len, i = 0;
        Py_BEGIN_ALLOW_THREADS
        for (; i + 4 <= size; i += 4) {
            partial[0][data[i]]++;
            partial[1][data[i + 1]]++;
            partial[2][data[i + 2]]++;
            partial[3][data[i + 3]]++;
        }
        for (; i < size; i++) {
            partial[0][data[i]]++;
        }
        Py_END_ALLOW_THREADS
        int64_t totals[256];
        for (int value = 0; value < 256; value++) {
            totals[value] = partial[0][value] + partial[1][value] + partial[2][value] +
                            partial[3][value];
        }
        memcpy(PyBytes_AS_STRING(result), totals, sizeof totals);
    }
    PyBuffer_Release(&buffer);
    return result;
}
