/* What recovery knows about the code beside the rows: the function starts it knows (a bit
 * per byte of code) and the bytes its functions cover (a byte per byte of code). Part of
 * _native.c (one compilation unit, included once, after _native_body.h); kept in its own file
 * so each part reads in one sitting. */

/* --- known function starts ------------------------------------------------------------------ */

/* Whether ``address`` is a function start marked by mark_start. */
static inline int
table_is_start(TableObject *self, uint64_t address)
{
    Py_ssize_t segment = code_segment(self, address);
    if (segment < 0 || self->start_bits[segment] == NULL) {
        return 0;
    }
    uint64_t offset = address - self->segment_starts[segment];
    return (self->start_bits[segment][offset >> 3] >> (offset & 7)) & 1;
}

/* mark_start(address, known): a function start FunctionRecovery knows (or no longer knows). */
static PyObject *
table_mark_start(TableObject *self, PyObject *args)
{
    PyObject *address_object;
    int known;
    if (!PyArg_ParseTuple(args, "Op", &address_object, &known)) {
        return NULL;
    }
    uint64_t address;
    int valid = address_value(address_object, &address);
    if (valid < 0) {
        return NULL;
    }
    if (!valid) { /* past 2**64 in a hostile image: explore never meets such an address */
        Py_RETURN_NONE;
    }
    Py_ssize_t segment = code_segment(self, address);
    if (segment < 0) {
        PyErr_SetString(PyExc_ValueError, "function starts are in executable code");
        return NULL;
    }
    uint64_t offset = address - self->segment_starts[segment];
    uint8_t *bits = self->start_bits[segment];
    if (bits == NULL) {
        if (!known) {
            Py_RETURN_NONE;
        }
        bits = PyMem_Calloc((size_t)(self->segment_lengths[segment] >> 3) + 1, 1);
        if (bits == NULL) {
            return PyErr_NoMemory();
        }
        self->start_bits[segment] = bits;
    }
    uint8_t bit = (uint8_t)(1u << (offset & 7));
    bits[offset >> 3] = known ? (uint8_t)(bits[offset >> 3] | bit) : (uint8_t)(bits[offset >> 3] & ~bit);
    Py_RETURN_NONE;
}

/* --- coverage ------------------------------------------------------------------------------
 * CodeCoverage's byte maps (function_starts.py): which bytes of each executable segment the
 * instructions of recovered functions cover. The Python path marks them lazily in numpy passes
 * over every instruction (addresses and sizes copied out first); here Body.cover marks a
 * body's bytes when it is added, and covered() and gaps() read the maps. The segments are
 * CodeCoverage's: the executable ones by address, each looked up by bisection over their
 * starts alone, and marking follows its numpy arithmetic (see cover_mark). */

/* The maps, made on first use; 0, or -1 with MemoryError. */
static int
cover_init(TableObject *table)
{
    if (table->cover_maps != NULL) {
        return 0;
    }
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < table->segment_count; i++) {
        count += table->segment_executable[i];
    }
    table->cover_bases = PyMem_Calloc((size_t)count + 1, sizeof(uint64_t));
    table->cover_lengths = PyMem_Calloc((size_t)count + 1, sizeof(uint64_t));
    uint8_t **maps = PyMem_Calloc((size_t)count + 1, sizeof(uint8_t *));
    if (table->cover_bases == NULL || table->cover_lengths == NULL || maps == NULL) {
        PyMem_Free(maps);
        PyErr_NoMemory();
        return -1;
    }
    table->cover_disjoint = 1;
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < table->segment_count; i++) {
        if (!table->segment_executable[i]) {
            continue;
        }
        table->cover_bases[k] = table->segment_starts[i];
        table->cover_lengths[k] = table->segment_lengths[i];
        if (k > 0 && table->cover_bases[k] - table->cover_bases[k - 1] <
                         table->cover_lengths[k - 1]) {
            table->cover_disjoint = 0;
        }
        maps[k] = PyMem_Calloc((size_t)table->cover_lengths[k] + 1, 1);
        if (maps[k] == NULL) {
            for (Py_ssize_t j = 0; j < k; j++) {
                PyMem_Free(maps[j]);
            }
            PyMem_Free(maps);
            PyErr_NoMemory();
            return -1;
        }
        k++;
    }
    table->cover_count = count;
    table->cover_maps = maps;
    return 0;
}

/* Index of the last coverage segment starting at or below ``address`` (bisect_right - 1). */
static Py_ssize_t
cover_index(const TableObject *table, uint64_t address)
{
    Py_ssize_t low = 0, high = table->cover_count;
    while (low < high) {
        Py_ssize_t middle = (low + high) / 2;
        if (address < table->cover_bases[middle]) {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    return low - 1;
}

/* Marks the instruction [address, end) (end mod 2**64) in segment k as CodeCoverage._mark
 * does: taken when base <= address < min(base + length, 2**64 - 1), marked from its offset to
 * min(end - base mod 2**64, length), so one wrapping past 2**64 runs to the segment's end. */
static inline void
cover_mark_in(TableObject *table, Py_ssize_t k, uint64_t address, uint64_t end)
{
    uint64_t base = table->cover_bases[k], length = table->cover_lengths[k];
    uint64_t high_bound = base + length < base ? UINT64_MAX : base + length;
    if (address < base || address >= high_bound) {
        return;
    }
    uint64_t low = address - base, high = end - base;
    if (high > length) {
        high = length;
    }
    if (high > low) {
        memset(table->cover_maps[k] + low, 1, (size_t)(high - low));
    }
}

static inline void
cover_mark(TableObject *table, uint64_t address, uint64_t end)
{
    if (table->cover_disjoint) { /* only the segment bisection finds can hold it */
        Py_ssize_t k = cover_index(table, address);
        if (k >= 0) {
            cover_mark_in(table, k, address, end);
        }
        return;
    }
    for (Py_ssize_t k = 0; k < table->cover_count; k++) {
        cover_mark_in(table, k, address, end);
    }
}

/* cover() -> the furthest end (mod 2**64) of the body's instructions, or None when it has
 * none, after marking their bytes covered (CodeCoverage.add). */
static PyObject *
body_cover(BodyObject *self, PyObject *unused)
{
    TableObject *table = self->table;
    if (cover_init(table) < 0) {
        return NULL;
    }
    uint64_t furthest = 0;
    for (Py_ssize_t i = 0; i < self->length; i++) {
        const Record *record = &table->records[self->order[i]];
        uint64_t end = record->address + record->size;
        furthest = i == 0 || end > furthest ? end : furthest;
        cover_mark(table, record->address, end);
    }
    return self->length ? u64_object(furthest) : Py_NewRef(Py_None);
}

/* cover_span(address, size): marks one instruction given as numbers (CodeCoverage.add for a
 * body of Instruction tuples over a decoder with a table, as tests build them). */
static PyObject *
table_cover_span(TableObject *self, PyObject *args)
{
    unsigned long long address, size;
    if (!PyArg_ParseTuple(args, "KK", &address, &size) || cover_init(self) < 0) {
        return NULL;
    }
    cover_mark(self, address, address + size);
    Py_RETURN_NONE;
}

/* covered(address) -> CodeCoverage.covered for any int. */
static PyObject *
table_covered(TableObject *self, PyObject *address_object)
{
    uint64_t address;
    int valid = address_value(address_object, &address);
    if (valid < 0 || cover_init(self) < 0) {
        return NULL;
    }
    Py_ssize_t k;
    uint64_t offset;
    if (valid) {
        k = cover_index(self, address);
        if (k < 0 || address - self->cover_bases[k] >= self->cover_lengths[k]) {
            Py_RETURN_FALSE;
        }
        offset = address - self->cover_bases[k];
    } else {
        /* Negative: below every segment. Past 2**64: in the last segment only if it reaches
         * that far (a hostile image mapped at the top of the address space). */
        PyObject *zero = PyLong_FromLong(0);
        int negative = zero ? PyObject_RichCompareBool(address_object, zero, Py_LT) : -1;
        Py_XDECREF(zero);
        if (negative != 0 || self->cover_count == 0) {
            return negative < 0 ? NULL : Py_NewRef(Py_False);
        }
        k = self->cover_count - 1;
        PyObject *base = u64_object(self->cover_bases[k]);
        PyObject *difference = base ? PyNumber_Subtract(address_object, base) : NULL;
        Py_XDECREF(base);
        if (difference == NULL) {
            return NULL;
        }
        offset = PyLong_AsUnsignedLongLong(difference);
        Py_DECREF(difference);
        if (offset == (uint64_t)-1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
                return NULL;
            }
            PyErr_Clear();
            Py_RETURN_FALSE;
        }
        if (offset >= self->cover_lengths[k]) {
            Py_RETURN_FALSE;
        }
    }
    return PyBool_FromLong(self->cover_maps[k][offset]);
}

/* base + offset as a Python int (past 2**64 near the top of a hostile image). */
static PyObject *
offset_object(uint64_t base, uint64_t offset)
{
    if (base + offset >= base) {
        return u64_object(base + offset);
    }
    PyObject *first = u64_object(base);
    PyObject *second = first ? u64_object(offset) : NULL;
    PyObject *sum = second ? PyNumber_Add(first, second) : NULL;
    Py_XDECREF(first);
    Py_XDECREF(second);
    return sum;
}

/* gaps() -> CodeCoverage.gaps: the maximal uncovered (low, high) ranges, segment by segment. */
static PyObject *
table_gaps(TableObject *self, PyObject *unused)
{
    if (cover_init(self) < 0) {
        return NULL;
    }
    PyObject *found = PyList_New(0);
    for (Py_ssize_t k = 0; found != NULL && k < self->cover_count; k++) {
        const uint8_t *map = self->cover_maps[k];
        size_t length = (size_t)self->cover_lengths[k], offset = 0;
        while (offset < length) {
            const uint8_t *gap = memchr(map + offset, 0, length - offset);
            if (gap == NULL) {
                break;
            }
            size_t low = (size_t)(gap - map);
            const uint8_t *covered = memchr(gap, 1, length - low);
            size_t high = covered == NULL ? length : (size_t)(covered - map);
            PyObject *low_object = offset_object(self->cover_bases[k], low);
            PyObject *high_object = low_object ? offset_object(self->cover_bases[k], high) : NULL;
            PyObject *pair = high_object ? PyTuple_Pack(2, low_object, high_object) : NULL;
            if (pair == NULL || PyList_Append(found, pair) < 0) {
                Py_CLEAR(found);
            }
            Py_XDECREF(low_object);
            Py_XDECREF(high_object);
            Py_XDECREF(pair);
            offset = high;
        }
    }
    return found;
}
