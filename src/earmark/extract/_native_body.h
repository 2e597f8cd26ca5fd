/* Function bodies over the instruction table: the Body type explore returns (a read-only
 * mapping address -> Instruction over table rows), ownership for CodeCoverage, and the
 * per-instruction passes of function_starts.referenced_code and function_features.build_features.
 * Part of _native.c (included once, after the table), kept in its own file so each part reads
 * in one sitting. */

/* --- growable row arrays ------------------------------------------------------------------ */

typedef struct {
    uint32_t *rows;
    Py_ssize_t length, capacity;
} Rows;

static int
rows_push(Rows *rows, uint32_t row)
{
    if (rows->length == rows->capacity) {
        Py_ssize_t capacity = rows->capacity ? rows->capacity * 2 : 64;
        uint32_t *grown = PyMem_Realloc(rows->rows, (size_t)capacity * sizeof(uint32_t));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        rows->rows = grown;
        rows->capacity = capacity;
    }
    rows->rows[rows->length++] = row;
    return 0;
}

/* --- Body ----------------------------------------------------------------------------------- */

typedef struct {
    uint64_t address;
    uint32_t row;
} AddressRow;

/* Sorts ``pairs`` by address (unique in a body); 0, or -1 with MemoryError. Explore takes a
 * body's instructions in a few ascending runs (one per chain of blocks), so adjacent runs are
 * merged pass by pass (a natural merge sort): one pass over a straight-line body, where qsort
 * made ~n log n comparator calls (measured ~2 % of analysis with its address lookups). */
static int
sort_address_rows(AddressRow *pairs, Py_ssize_t length)
{
    Py_ssize_t first_run = 1;
    while (first_run < length && pairs[first_run - 1].address <= pairs[first_run].address) {
        first_run++;
    }
    if (first_run >= length) {
        return 0;
    }
    AddressRow *buffer = PyMem_Malloc((size_t)length * sizeof(AddressRow));
    if (buffer == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    AddressRow *source = pairs, *target = buffer;
    for (;;) {
        Py_ssize_t start = 0;
        while (start < length) {
            Py_ssize_t middle = start + 1;
            while (middle < length && source[middle - 1].address <= source[middle].address) {
                middle++;
            }
            if (start == 0 && middle == length) {
                break; /* one run: sorted */
            }
            Py_ssize_t end = middle;
            if (end < length) {
                end++;
                while (end < length && source[end - 1].address <= source[end].address) {
                    end++;
                }
            }
            Py_ssize_t a = start, b = middle, k = start;
            while (a < middle && b < end) {
                target[k++] = source[b].address < source[a].address ? source[b++] : source[a++];
            }
            while (a < middle) {
                target[k++] = source[a++];
            }
            while (b < end) {
                target[k++] = source[b++];
            }
            start = end;
        }
        if (start == 0) {
            break;
        }
        AddressRow *swap = source;
        source = target;
        target = swap;
    }
    if (source != pairs) {
        memcpy(pairs, source, (size_t)length * sizeof(AddressRow));
    }
    PyMem_Free(buffer);
    return 0;
}

/* Position of ``address`` in ``length`` pairs sorted by address, or -1. */
static Py_ssize_t
pairs_position(const AddressRow *pairs, Py_ssize_t length, uint64_t address)
{
    Py_ssize_t low = 0, high = length;
    while (low < high) {
        Py_ssize_t middle = (low + high) / 2;
        if (pairs[middle].address == address) {
            return middle;
        }
        if (pairs[middle].address < address) {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    return -1;
}

/* A Body over ``rows`` (taken over: freed with the body), or NULL. ``*sorted_pairs`` (when not
 * NULL) receives its (address, row) pairs by address, for the caller to free; NULL when empty. */
static PyObject *
body_from_rows(TableObject *table, Rows *rows, AddressRow **sorted_pairs)
{
    if (sorted_pairs != NULL) {
        *sorted_pairs = NULL;
    }
    BodyObject *body = PyObject_New(BodyObject, &BodyType);
    if (body == NULL) {
        PyMem_Free(rows->rows);
        return NULL;
    }
    body->table = (TableObject *)Py_NewRef(table);
    body->length = rows->length;
    body->order = rows->rows; /* may be NULL when empty */
    body->sorted = NULL;
    body->block_count = body->edge_count = body->conditional_count = 0;
    body->conditional = NULL;
    rows->rows = NULL;
    if (body->length) {
        AddressRow *pairs = PyMem_Malloc((size_t)body->length * sizeof(AddressRow));
        body->sorted = PyMem_Malloc((size_t)body->length * sizeof(uint32_t));
        if (pairs == NULL || body->sorted == NULL) {
            PyMem_Free(pairs);
            Py_DECREF(body);
            return PyErr_NoMemory();
        }
        for (Py_ssize_t i = 0; i < body->length; i++) {
            pairs[i].address = table->records[body->order[i]].address;
            pairs[i].row = body->order[i];
        }
        if (sort_address_rows(pairs, body->length) < 0) {
            PyMem_Free(pairs);
            Py_DECREF(body);
            return NULL;
        }
        for (Py_ssize_t i = 0; i < body->length; i++) {
            body->sorted[i] = pairs[i].row;
        }
        if (sorted_pairs != NULL) {
            *sorted_pairs = pairs;
        } else {
            PyMem_Free(pairs);
        }
    }
    return (PyObject *)body;
}

static void
body_dealloc(BodyObject *self)
{
    PyMem_Free(self->order);
    PyMem_Free(self->sorted);
    PyMem_Free(self->conditional);
    Py_XDECREF(self->table);
    PyObject_Free(self);
}

/* Position of ``address`` in the sorted rows, or -1. */
static Py_ssize_t
body_position(BodyObject *self, uint64_t address)
{
    Py_ssize_t low = 0, high = self->length;
    const Record *records = self->table->records;
    while (low < high) {
        Py_ssize_t middle = (low + high) / 2;
        uint64_t found = records[self->sorted[middle]].address;
        if (found == address) {
            return middle;
        }
        if (found < address) {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    return -1;
}

static Py_ssize_t
body_length(BodyObject *self)
{
    return self->length;
}

static int
body_contains(BodyObject *self, PyObject *key)
{
    uint64_t address;
    if (!PyLong_Check(key)) {
        return 0;
    }
    int valid = address_value(key, &address);
    if (valid <= 0) {
        return valid;
    }
    return body_position(self, address) >= 0;
}

static PyObject *
body_subscript(BodyObject *self, PyObject *key)
{
    uint64_t address;
    int valid = PyLong_Check(key) ? address_value(key, &address) : 0;
    if (valid < 0) {
        return NULL;
    }
    Py_ssize_t position = valid ? body_position(self, address) : -1;
    if (position < 0) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return instruction_object(self->table, self->sorted[position]);
}

/* Addresses in the order explore took them (dict iteration order on the Python path). */
static PyObject *
body_iter(BodyObject *self)
{
    PyObject *addresses = PyList_New(self->length);
    for (Py_ssize_t i = 0; addresses != NULL && i < self->length; i++) {
        PyObject *address = u64_object(self->table->records[self->order[i]].address);
        if (address == NULL) {
            Py_CLEAR(addresses);
            break;
        }
        PyList_SET_ITEM(addresses, i, address);
    }
    PyObject *iterator = addresses ? PyObject_GetIter(addresses) : NULL;
    Py_XDECREF(addresses);
    return iterator;
}

static PyObject *
body_values(BodyObject *self, PyObject *unused)
{
    PyObject *values = PyList_New(self->length);
    for (Py_ssize_t i = 0; values != NULL && i < self->length; i++) {
        PyObject *instruction = instruction_object(self->table, self->order[i]);
        if (instruction == NULL) {
            Py_CLEAR(values);
            break;
        }
        PyList_SET_ITEM(values, i, instruction);
    }
    return values;
}

/* conditional_targets() -> where its conditional branches lead (both ways), other than its
 * own start, as FunctionRecovery.drop_unwind_fragments collects them from the successors. */
static PyObject *
body_conditional_targets(BodyObject *self, PyObject *unused)
{
    PyObject *found = PyList_New(self->conditional_count);
    for (Py_ssize_t i = 0; found != NULL && i < self->conditional_count; i++) {
        PyObject *value = u64_object(self->conditional[i]);
        if (value == NULL) {
            Py_CLEAR(found);
            break;
        }
        PyList_SET_ITEM(found, i, value);
    }
    return found;
}

/* counts() -> (block count, edge count) of the explored body. */
static PyObject *
body_counts(BodyObject *self, PyObject *unused)
{
    return Py_BuildValue("(nn)", self->block_count, self->edge_count);
}

/* Index of ``start`` in the table's owner starts (added when new), or -1 with an error. */
static int64_t
owner_index(TableObject *table, PyObject *start_object, uint64_t start)
{
    PyObject *found = PyDict_GetItemWithError(table->owner_indexes, start_object);
    if (found != NULL) {
        return PyLong_AsLongLong(found);
    }
    if (PyErr_Occurred()) {
        return -1;
    }
    if (table->owner_count == table->owner_capacity) {
        uint32_t capacity = table->owner_capacity ? table->owner_capacity * 2 : 256;
        uint64_t *grown =
            PyMem_Realloc(table->owner_starts, (size_t)capacity * sizeof(uint64_t));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        table->owner_starts = grown;
        table->owner_capacity = capacity;
    }
    PyObject *index = PyLong_FromUnsignedLong(table->owner_count);
    if (index == NULL || PyDict_SetItem(table->owner_indexes, start_object, index) < 0) {
        Py_XDECREF(index);
        return -1;
    }
    Py_DECREF(index);
    table->owner_starts[table->owner_count] = start;
    return table->owner_count++;
}

/* The owner number of the function start ``start_object``, or -1 with an exception set. */
static int64_t
start_owner_index(TableObject *table, PyObject *start_object)
{
    uint64_t start;
    if (address_value(start_object, &start) <= 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "a function start is an address");
        }
        return -1;
    }
    return owner_index(table, start_object, start);
}

/* own(start): CodeCoverage.add's ownership update (shared when another function owns it). */
static PyObject *
body_own(BodyObject *self, PyObject *start_object)
{
    int64_t index = start_owner_index(self->table, start_object);
    if (index < 0) {
        return NULL;
    }
    Record *records = self->table->records;
    for (Py_ssize_t i = 0; i < self->length; i++) {
        Record *record = &records[self->order[i]];
        if (!(record->flags & FLAG_OWNED)) {
            record->flags |= FLAG_OWNED;
            record->owner = (uint32_t)index;
        } else if (record->owner != (uint32_t)index) {
            record->flags |= FLAG_SHARED;
        }
    }
    Py_RETURN_NONE;
}

/* disown(start): CodeCoverage.remove (only what ``start`` alone owns is released). */
static PyObject *
body_disown(BodyObject *self, PyObject *start_object)
{
    int64_t index = start_owner_index(self->table, start_object);
    if (index < 0) {
        return NULL;
    }
    Record *records = self->table->records;
    for (Py_ssize_t i = 0; i < self->length; i++) {
        Record *record = &records[self->order[i]];
        if ((record->flags & (FLAG_OWNED | FLAG_SHARED)) == FLAG_OWNED &&
            record->owner == (uint32_t)index) {
            record->flags &= (uint8_t)~FLAG_OWNED;
        }
    }
    Py_RETURN_NONE;
}

/* referenced_code() -> code addresses taken as data: address immediates into code, then a
 * lea's memory operand into code, instruction by instruction (function_starts.referenced_code). */
static PyObject *
body_referenced_code(BodyObject *self, PyObject *unused)
{
    TableObject *table = self->table;
    PyObject *found = PyList_New(0);
    for (Py_ssize_t i = 0; found != NULL && i < self->length; i++) {
        const Record *record = &table->records[self->order[i]];
        const Text *text = &table->texts[record->text];
        PyObject *immediates = text->address_immediates;
        for (Py_ssize_t j = 0; found != NULL && j < PyTuple_GET_SIZE(immediates); j++) {
            PyObject *value = PyTuple_GET_ITEM(immediates, j);
            uint64_t address;
            int valid = address_value(value, &address);
            if (valid < 0 || (valid && table_is_code(table, address) &&
                              PyList_Append(found, value) < 0)) {
                Py_CLEAR(found);
            }
        }
        if (found != NULL && record->flags & FLAG_MEMORY && text->is_lea &&
            table_is_code(table, record_memory(table, record))) {
            PyObject *value = u64_object(record_memory(table, record));
            if (value == NULL || PyList_Append(found, value) < 0) {
                Py_CLEAR(found);
            }
            Py_XDECREF(value);
        }
    }
    return found;
}

/* The token features of a text row, the first time found in ``known`` (a dict: token ->
 * answer, or NULL) or else asked of ``token_features``; 0 or -1. A sample's table asks for
 * every text once (762k texts over the PE bench (a) KB), and the Python memo already holds
 * nearly all of them: a dict lookup here instead of a call measured ~0.15 CPU s less. */
static int
text_features(Text *text, PyObject *token_features, PyObject *known)
{
    if (text->has_features) {
        return 0;
    }
    PyObject *answer = known != NULL ? PyDict_GetItemWithError(known, text->token) : NULL;
    if (answer != NULL) {
        Py_INCREF(answer);
    } else if (PyErr_Occurred()) {
        return -1;
    } else {
        answer = PyObject_CallOneArg(token_features, text->token);
    }
    if (answer == NULL) {
        return -1;
    }
    if (!PyTuple_Check(answer) || PyTuple_GET_SIZE(answer) != 3 ||
        !PyTuple_Check(PyTuple_GET_ITEM(answer, 2))) {
        Py_DECREF(answer);
        PyErr_SetString(PyExc_TypeError, "token_features must return (id, robust id, values)");
        return -1;
    }
    PyObject *robust = PyTuple_GET_ITEM(answer, 1);
    text->token_id = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(answer, 0));
    text->robust_id = robust == Py_None ? 0 : PyLong_AsUnsignedLongLong(robust);
    if (PyErr_Occurred()) {
        Py_DECREF(answer);
        return -1;
    }
    text->has_robust = robust != Py_None;
    text->immediates = Py_NewRef(PyTuple_GET_ITEM(answer, 2));
    text->has_features = 1;
    Py_DECREF(answer);
    return 0;
}

/* describe(start, token_features[, known])
 *     -> (tokens, end, references, large, token_ids, robust_ids, immediates)
 *
 * ``known``: token_features' memo (a dict of its answers by token), looked in first.
 * The per-instruction pass of function_features.build_features, in address order: the token
 * stream, the end of the last instruction (at least ``start``), the addresses the code
 * references (address immediates, then a plain instruction's memory operand) and all large
 * immediates, each in instruction order; then the MinHash ids of the tokens and of the robust
 * tokens that are kept (uint64 bytes) and the stream's distinct immediates in first-seen order
 * (function_features.stream_immediates). */
static PyObject *
body_describe(BodyObject *self, PyObject *args)
{
    PyObject *start, *token_features, *known = NULL;
    if (!PyArg_ParseTuple(args, "OO|O!", &start, &token_features, &PyDict_Type, &known)) {
        return NULL;
    }
    TableObject *table = self->table;
    PyObject *tokens = PyTuple_New(self->length);
    PyObject *references = PyList_New(0);
    PyObject *large = PyList_New(0);
    PyObject *end = Py_NewRef(start);
    uint64_t furthest = 0;
    PyObject *token_ids = PyBytes_FromStringAndSize(NULL, self->length * 8);
    PyObject *robust_ids = PyBytes_FromStringAndSize(NULL, self->length * 8);
    PyObject *seen = PyDict_New(); /* immediates in first-seen order */
    Py_ssize_t robust_count = 0;
    int failed = tokens == NULL || references == NULL || large == NULL || token_ids == NULL ||
                 robust_ids == NULL || seen == NULL;
    for (Py_ssize_t i = 0; !failed && i < self->length; i++) {
        const Record *record = &table->records[self->sorted[i]];
        Text *text = &table->texts[record->text];
        PyTuple_SET_ITEM(tokens, i, Py_NewRef(text->token));
        if (text_features(text, token_features, known) < 0) {
            failed = 1;
            break;
        }
        ((uint64_t *)PyBytes_AS_STRING(token_ids))[i] = text->token_id;
        if (text->has_robust) {
            ((uint64_t *)PyBytes_AS_STRING(robust_ids))[robust_count++] = text->robust_id;
        }
        for (Py_ssize_t j = 0; !failed && j < PyTuple_GET_SIZE(text->immediates); j++) {
            failed = PyDict_SetItem(seen, PyTuple_GET_ITEM(text->immediates, j), Py_None) < 0;
        }
        uint64_t following = record->address + record->size;
        int past_end = following < record->address; /* beyond 2**64: in no body, no leader */
        if (past_end) {
            PyObject *candidate = following_object(record);
            int later = candidate ? PyObject_RichCompareBool(candidate, end, Py_GT) : -1;
            if (later > 0) {
                Py_SETREF(end, Py_NewRef(candidate));
            }
            Py_XDECREF(candidate);
            failed = later < 0;
        } else if (following > furthest) {
            furthest = following; /* not the last one's end: instructions may overlap */
        }
        uint8_t kind = text->kind;
        PyObject *immediates = text->address_immediates;
        for (Py_ssize_t j = 0; !failed && j < PyTuple_GET_SIZE(immediates); j++) {
            failed = PyList_Append(references, PyTuple_GET_ITEM(immediates, j)) < 0;
        }
        if (!failed && record->flags & FLAG_MEMORY && kind == KIND_PLAIN) {
            PyObject *memory = u64_object(record_memory(table, record));
            failed = memory == NULL || PyList_Append(references, memory) < 0;
            Py_XDECREF(memory);
        }
        PyObject *values = text->large_immediates;
        for (Py_ssize_t j = 0; !failed && j < PyTuple_GET_SIZE(values); j++) {
            failed = PyList_Append(large, PyTuple_GET_ITEM(values, j)) < 0;
        }
    }
    if (!failed && self->length) {
        /* max(start, every end), compared as Python ints (start may be any int). */
        PyObject *candidate = u64_object(furthest);
        int later = candidate ? PyObject_RichCompareBool(candidate, end, Py_GT) : -1;
        if (later > 0) {
            Py_SETREF(end, Py_NewRef(candidate));
        }
        Py_XDECREF(candidate);
        failed = later < 0;
    }
    PyObject *result = NULL;
    if (!failed && _PyBytes_Resize(&robust_ids, robust_count * 8) == 0) {
        PyObject *immediates = PySequence_Tuple(seen);
        if (immediates != NULL) {
            result = Py_BuildValue("(OOOOOON)", tokens, end, references, large, token_ids,
                                   robust_ids, immediates);
        }
    }
    Py_XDECREF(token_ids);
    Py_XDECREF(robust_ids);
    Py_XDECREF(seen);
    Py_XDECREF(tokens);
    Py_DECREF(end);
    Py_XDECREF(references);
    Py_XDECREF(large);
    return result;
}

static PyObject *body_cover(BodyObject *self, PyObject *unused); /* _native_coverage.h */

static PyMappingMethods body_mapping = {
    .mp_length = (lenfunc)body_length,
    .mp_subscript = (binaryfunc)body_subscript,
};

static PySequenceMethods body_sequence = {
    .sq_contains = (objobjproc)body_contains,
};

static PyMethodDef body_methods[] = {
    {"values", (PyCFunction)body_values, METH_NOARGS, "values() -> Instructions in explore order"},
    {"conditional_targets", (PyCFunction)body_conditional_targets, METH_NOARGS,
     "conditional_targets() -> where its conditional branches lead, other than its start"},
    {"counts", (PyCFunction)body_counts, METH_NOARGS, "counts() -> (block count, edge count)"},
    {"own", (PyCFunction)body_own, METH_O, "own(start): take ownership of the instructions"},
    {"cover", (PyCFunction)body_cover, METH_NOARGS,
     "cover() -> furthest end of its instructions (None when empty), their bytes marked covered"},
    {"disown", (PyCFunction)body_disown, METH_O, "disown(start): release what start owns"},
    {"referenced_code", (PyCFunction)body_referenced_code, METH_NOARGS,
     "referenced_code() -> code addresses the body takes as data"},
    {"describe", (PyCFunction)body_describe, METH_VARARGS,
     "describe(start, token_features[, known]) -> (tokens, end, references, large, token_ids, "
     "robust_ids, immediates)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject BodyType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "earmark.extract._native.Body",
    .tp_basicsize = sizeof(BodyObject),
    .tp_dealloc = (destructor)body_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The instructions of one explored function: address -> Instruction, read-only",
    .tp_as_mapping = &body_mapping,
    .tp_as_sequence = &body_sequence,
    .tp_iter = (getiterfunc)body_iter,
    .tp_methods = body_methods,
};
