/* The descent of FunctionRecovery.explore and the heuristics over ownership. Part of _native.c (one compilation unit, included once; split so each
 * part reads in one sitting). */

/* --- explore ------------------------------------------------------------------------------- */

#define EXPLORE_DOC                                                                           \
    "explore(start, max_instructions, fragments, import_slots, no_return, " \
    "follow_indirect, body, lookback) -> (Body, invalid, truncated)"

/* Growable uint64 arrays; ``valid`` is 0 for a value past 2**64 (pending addresses only). */
typedef struct {
    uint64_t *values;
    uint8_t *valid;
    Py_ssize_t length, capacity;
} Values;

static int
values_push(Values *values, uint64_t value, int valid)
{
    if (values->length == values->capacity) {
        Py_ssize_t capacity = values->capacity ? values->capacity * 2 : 32;
        uint64_t *grown = PyMem_Realloc(values->values, (size_t)capacity * sizeof(uint64_t));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        values->values = grown;
        uint8_t *flags = PyMem_Realloc(values->valid, (size_t)capacity);
        if (flags == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        values->valid = flags;
        values->capacity = capacity;
    }
    values->values[values->length] = value;
    values->valid[values->length++] = (uint8_t)valid;
    return 0;
}

/* Pushes a Python int (any value) onto ``values``; 0 or -1. */
static int
values_push_object(Values *values, PyObject *object)
{
    uint64_t value = 0;
    int valid = address_value(object, &value);
    return valid < 0 ? -1 : values_push(values, value, valid);
}

static void
values_free(Values *values)
{
    PyMem_Free(values->values);
    PyMem_Free(values->valid);
}

static int
compare_u64(const void *first, const void *second)
{
    uint64_t a = *(const uint64_t *)first, b = *(const uint64_t *)second;
    return (a > b) - (a < b);
}

static int
sorted_contains(const uint64_t *values, Py_ssize_t length, uint64_t value)
{
    Py_ssize_t low = 0, high = length;
    while (low < high) {
        Py_ssize_t middle = (low + high) / 2;
        if (values[middle] == value) {
            return 1;
        }
        if (values[middle] < value) {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    return 0;
}

/* The name after the last "!" of an import name is in ``no_return``: 1, 0, or -1. */
static int
never_returns(PyObject *name, PyObject *no_return)
{
    if (!PyUnicode_Check(name)) {
        return 0;
    }
    Py_ssize_t length = PyUnicode_GET_LENGTH(name);
    Py_ssize_t bang = PyUnicode_FindChar(name, '!', 0, length, -1);
    if (bang == -2) {
        return -1;
    }
    PyObject *base = PyUnicode_Substring(name, bang + 1, length);
    int found = base ? PySet_Contains(no_return, base) : -1;
    Py_XDECREF(base);
    return found;
}

/* The first operand of an op_str (up to the first ", "). */
static PyObject *
first_operand(PyObject *op_str)
{
    Py_ssize_t length = PyUnicode_GET_LENGTH(op_str);
    for (Py_ssize_t i = 0; i + 1 < length; i++) {
        if (PyUnicode_READ_CHAR(op_str, i) == ',' && PyUnicode_READ_CHAR(op_str, i + 1) == ' ') {
            return PyUnicode_Substring(op_str, 0, i);
        }
    }
    return Py_NewRef(op_str);
}

/* What explore keeps in C instead of the body's leaders set and successors dict (they are only
 * read back as the block and edge counts and the conditional targets, all fixed once the body
 * is explored): measured ~8 MB of Python objects on zstandard _cffi. */
typedef struct {
    Values leaders, edges, conditional, pending;
} Flow;

/* Runs follow_indirect(body, jump, recent, import_registers, pending) with fresh leaders,
 * successors and pending containers, and takes what it added into ``flow``; 0 or -1. */
static int
call_follow_indirect(PyObject *follow_indirect, PyObject *body, PyObject *jump,
                     PyObject *recent, PyObject *import_registers, Flow *flow)
{
    PyObject *leaders = PySet_New(NULL);
    PyObject *successors = PyDict_New();
    PyObject *pending = PyList_New(0);
    int failed = leaders == NULL || successors == NULL || pending == NULL ||
                 PyObject_SetAttrString(body, "leaders", leaders) < 0 ||
                 PyObject_SetAttrString(body, "successors", successors) < 0;
    PyObject *answer =
        failed ? NULL
               : PyObject_CallFunctionObjArgs(follow_indirect, body, jump, recent,
                                              import_registers, pending, NULL);
    failed = answer == NULL;
    Py_XDECREF(answer);
    PyObject *iterator = failed ? NULL : PyObject_GetIter(leaders);
    PyObject *item;
    while (iterator != NULL && (item = PyIter_Next(iterator)) != NULL) {
        uint64_t value;
        int valid = address_value(item, &value);
        Py_DECREF(item);
        if (valid < 0 || (valid && values_push(&flow->leaders, value, 1) < 0)) {
            break;
        }
    }
    Py_XDECREF(iterator);
    Py_ssize_t position = 0;
    PyObject *key, *targets;
    while (!failed && !PyErr_Occurred() && PyDict_Next(successors, &position, &key, &targets)) {
        PyObject *sequence = PySequence_Fast(targets, "successors must be sequences");
        for (Py_ssize_t i = 0; sequence != NULL && i < PySequence_Fast_GET_SIZE(sequence); i++) {
            uint64_t value;
            int valid = address_value(PySequence_Fast_GET_ITEM(sequence, i), &value);
            if (valid < 0 || (valid && values_push(&flow->edges, value, 1) < 0)) {
                break;
            }
        }
        Py_XDECREF(sequence);
    }
    for (Py_ssize_t i = 0; !failed && !PyErr_Occurred() && i < PyList_GET_SIZE(pending); i++) {
        values_push_object(&flow->pending, PyList_GET_ITEM(pending, i));
    }
    failed = failed || PyErr_Occurred() != NULL;
    if (!failed) { /* taken into ``flow``: the body's own containers stay empty */
        failed = PySet_Clear(leaders) < 0 || (PyDict_Clear(successors), 0);
    }
    Py_XDECREF(leaders);
    Py_XDECREF(successors);
    Py_XDECREF(pending);
    return failed ? -1 : 0;
}

/* The descent of FunctionRecovery.explore over the table; see functions.py for the rules, which
 * this follows step by step (the Python loop there is the reference). The body's leaders and
 * successors stay in C: the Body returned carries the block and edge counts and the targets of
 * its conditional branches instead. */
static PyObject *
table_explore(TableObject *self, PyObject *args)
{
    PyObject *start_object, *fragments, *import_slots, *no_return;
    PyObject *follow_indirect, *body_object;
    Py_ssize_t max_instructions, lookback;
    if (!PyArg_ParseTuple(args, "OnO!O!OOOn", &start_object, &max_instructions, &PyList_Type,
                          &fragments, &PyDict_Type, &import_slots, &no_return, &follow_indirect,
                          &body_object, &lookback)) {
        return NULL;
    }
    uint64_t start = 0;
    int start_valid = address_value(start_object, &start);
    if (start_valid < 0) {
        return NULL;
    }
    /* A start past 2**64 (an export of a hostile image mapped at the top of the address space)
     * decodes to nothing, as on the Python path: an empty, invalid body. */
    PyObject *calls = PyObject_GetAttrString(body_object, "calls");
    PyObject *tail_jumps = PyObject_GetAttrString(body_object, "tail_jumps");
    PyObject *direct_jumps = PyObject_GetAttrString(body_object, "direct_jumps");
    PyObject *called_imports = PyObject_GetAttrString(body_object, "called_imports");
    Flow flow;
    memset(&flow, 0, sizeof flow);
    Rows rows = {NULL, 0, 0};
    uint32_t *trail = lookback > 0 ? PyMem_Calloc((size_t)lookback, sizeof(uint32_t)) : NULL;
    int failed = !calls || !tail_jumps || !direct_jumps || !called_imports ||
                 (lookback > 0 && trail == NULL) || !PyList_Check(calls) ||
                 !PyList_Check(tail_jumps) || !PyList_Check(direct_jumps) ||
                 !PyList_Check(called_imports);
    if (failed && !PyErr_Occurred()) {
        PyErr_SetString(PyExc_TypeError, "malformed function body");
    }
    int invalid = 0, truncated = 0;
    if (++self->serial == 0) { /* stamps wrapped: forget them all */
        for (uint32_t row = 0; row < self->count; row++) {
            self->records[row].stamp = 0;
        }
        self->serial = 1;
    }
    uint32_t serial = self->serial;
    if (!failed) {
        failed = (start_valid && values_push(&flow.leaders, start, 1) < 0) ||
                 values_push(&flow.pending, start, start_valid) < 0;
    }
    while (!failed && (flow.pending.length || PyList_GET_SIZE(fragments))) {
        if (!flow.pending.length) {
            Py_ssize_t last = PyList_GET_SIZE(fragments) - 1;
            PyObject *fragment = Py_NewRef(PyList_GET_ITEM(fragments, last));
            failed = PyList_SetSlice(fragments, last, last + 1, NULL) < 0;
            uint64_t value = 0;
            int valid = failed ? -1 : address_value(fragment, &value);
            int64_t row = valid > 0 ? table_find(self, value) : -1;
            int inside = row >= 0 && !(self->records[row].flags & FLAG_INVALID) &&
                         self->records[row].stamp == serial;
            int other = valid > 0 && table_is_start(self, value);
            if (valid < 0) {
                failed = 1;
            } else if (!inside && !other && !truncated) {
                failed = (valid && values_push(&flow.leaders, value, 1) < 0) ||
                         values_push(&flow.pending, value, valid) < 0;
            }
            Py_DECREF(fragment);
            continue;
        }
        flow.pending.length--;
        uint64_t address = flow.pending.values[flow.pending.length];
        int valid = flow.pending.valid[flow.pending.length];
        /* ``valid == 0``: past 2**64 (after an instruction at the very top of a hostile image):
         * in no body, no known function and no segment, so it ends the run as invalid. */
        PyObject *import_registers = NULL;
        Py_ssize_t trail_length = 0;
        for (;;) {
            int64_t row = valid ? table_find(self, address) : -1;
            if (row >= 0 && !(self->records[row].flags & FLAG_INVALID) &&
                self->records[row].stamp == serial) {
                failed = values_push(&flow.leaders, address, 1) < 0;
                break;
            }
            if (valid && address != start) {
                if (table_is_start(self, address)) {
                    break; /* flowed into another function */
                }
            }
            if (rows.length >= max_instructions) {
                truncated = 1;
                flow.pending.length = 0;
                break;
            }
            if (row < 0) { /* not decoded yet (a found row is reused: one probe) */
                row = valid ? table_decode(self, address) : -2;
            }
            if (row == -1) {
                failed = 1;
                break;
            }
            if (row == -2 || self->records[row].flags & FLAG_INVALID) {
                invalid = 1;
                break;
            }
            Record *record = &self->records[row];
            record->stamp = serial;
            if (rows_push(&rows, (uint32_t)row) < 0) {
                failed = 1;
                break;
            }
            if (lookback > 0) {
                trail[trail_length % lookback] = (uint32_t)row;
            }
            trail_length++;
            Text *text = &self->texts[record->text];
            uint64_t following = address + record->size;
            int following_valid = following >= address;
            if (text->kind == KIND_PLAIN) {
                if (record->flags & FLAG_MEMORY && text->is_mov && !text->printed_target) {
                    PyObject *memory = u64_object(record_memory(self, record));
                    PyObject *name = memory ? PyDict_GetItemWithError(import_slots, memory) : NULL;
                    Py_XDECREF(memory);
                    if (name != NULL && name != Py_None) { /* mov esi, [IAT]; call esi */
                        if (import_registers == NULL) {
                            import_registers = PyDict_New();
                        }
                        PyObject *op_str = import_registers ? text_op_str(text) : NULL;
                        PyObject *reg = op_str ? first_operand(op_str) : NULL;
                        failed = reg == NULL || PyDict_SetItem(import_registers, reg, name) < 0;
                        Py_XDECREF(reg);
                    } else if (PyErr_Occurred()) {
                        failed = 1;
                    }
                    if (failed) {
                        break;
                    }
                }
                address = following;
                valid = following_valid;
                continue;
            }
            if (text->kind == KIND_CALL) {
                PyObject *name = NULL; /* new reference or NULL */
                if (record->flags & FLAG_TARGET) {
                    name = table_thunk(self, record->target, import_slots);
                } else if (record->flags & FLAG_MEMORY) {
                    PyObject *memory = u64_object(record_memory(self, record));
                    name = memory ? PyDict_GetItemWithError(import_slots, memory) : NULL;
                    Py_XINCREF(name);
                    Py_XDECREF(memory);
                } else if (import_registers != NULL && !text->printed_target) {
                    PyObject *op_str = text_op_str(text);
                    name = op_str ? PyDict_GetItemWithError(import_registers, op_str) : NULL;
                    Py_XINCREF(name);
                }
                if (PyErr_Occurred()) {
                    Py_XDECREF(name);
                    failed = 1;
                    break;
                }
                if (name != NULL && name != Py_None) {
                    int ends = PyList_Append(called_imports, name) < 0
                                   ? -1
                                   : never_returns(name, no_return);
                    Py_DECREF(name);
                    if (ends != 0) {
                        failed = ends < 0;
                        break;
                    }
                } else {
                    Py_XDECREF(name);
                    record = &self->records[row]; /* the callback may have grown the table */
                    if (record->flags & FLAG_TARGET && table_is_code(self, record->target)) {
                        PyObject *target = u64_object(record->target);
                        failed = target == NULL || PyList_Append(calls, target) < 0;
                        Py_XDECREF(target);
                        if (failed) {
                            break;
                        }
                    }
                }
                address = following;
                valid = following_valid;
                continue;
            }
            if (text->kind == KIND_CONDITIONAL) {
                if (record->flags & FLAG_TARGET && table_is_code(self, record->target)) {
                    uint64_t target = record->target;
                    failed = values_push(&flow.leaders, target, 1) < 0 ||
                             values_push(&flow.pending, target, 1) < 0 ||
                             values_push(&flow.edges, target, 1) < 0 ||
                             (target != start &&
                              values_push(&flow.conditional, target, 1) < 0);
                }
                if (!failed && following_valid) {
                    failed = values_push(&flow.edges, following, 1) < 0 ||
                             values_push(&flow.leaders, following, 1) < 0 ||
                             (following != start &&
                              values_push(&flow.conditional, following, 1) < 0);
                }
                if (failed) {
                    break;
                }
                address = following;
                valid = following_valid;
                continue;
            }
            if (text->kind == KIND_JUMP && record->flags & FLAG_TARGET) {
                uint64_t target_value = record->target;
                PyObject *target = u64_object(target_value);
                int other = table_is_start(self, target_value);
                if (target == NULL) {
                    failed = 1;
                } else if ((other && target_value != start) || !table_is_code(self, target_value)) {
                    failed = PyList_Append(tail_jumps, target) < 0;
                } else {
                    PyObject *name = table_thunk(self, target_value, import_slots);
                    if (name == NULL) {
                        failed = 1;
                    } else if (name != Py_None) {
                        failed = PyList_Append(called_imports, name) < 0;
                    } else {
                        PyObject *here = u64_object(address);
                        PyObject *jump = here ? PyTuple_Pack(2, here, target) : NULL;
                        failed = jump == NULL || values_push(&flow.leaders, target_value, 1) < 0 ||
                                 values_push(&flow.edges, target_value, 1) < 0 ||
                                 PyList_Append(direct_jumps, jump) < 0 ||
                                 values_push(&flow.pending, target_value, 1) < 0;
                        Py_XDECREF(here);
                        Py_XDECREF(jump);
                    }
                    Py_XDECREF(name);
                }
                Py_XDECREF(target);
                break;
            }
            if (text->kind == KIND_JUMP) {
                /* Indirect: import slot, import register or jump table, decided in Python
                 * (FunctionRecovery._follow_indirect_jump) from the jump and its run. */
                Py_ssize_t recent = trail_length < lookback ? trail_length : lookback;
                PyObject *trail_list = PyList_New(recent);
                for (Py_ssize_t i = 0; trail_list != NULL && i < recent; i++) {
                    Py_ssize_t position = (trail_length - recent + i) % lookback;
                    PyObject *instruction = instruction_object(self, trail[position]);
                    if (instruction == NULL) {
                        Py_CLEAR(trail_list);
                        break;
                    }
                    PyList_SET_ITEM(trail_list, i, instruction);
                }
                PyObject *jump = trail_list ? instruction_object(self, (uint32_t)row) : NULL;
                if (jump != NULL && import_registers == NULL) {
                    import_registers = PyDict_New();
                }
                failed = jump == NULL || import_registers == NULL ||
                         call_follow_indirect(follow_indirect, body_object, jump, trail_list,
                                              import_registers, &flow) < 0;
                Py_XDECREF(jump);
                Py_XDECREF(trail_list);
            }
            break; /* KIND_END and every jump end the run */
        }
        Py_XDECREF(import_registers);
    }
    PyObject *result = NULL;
    BodyObject *body = NULL;
    AddressRow *pairs = NULL; /* the body's (address, row) by address: lookups without records */
    if (!failed) {
        body = (BodyObject *)body_from_rows(self, &rows, &pairs);
    } else {
        PyMem_Free(rows.rows);
    }
    if (body != NULL) {
        /* Block and edge counts as function_features counted them from leaders/successors. */
        Values *leaders = &flow.leaders;
        qsort(leaders->values, (size_t)leaders->length, sizeof(uint64_t), compare_u64);
        Py_ssize_t unique = 0;
        for (Py_ssize_t i = 0; i < leaders->length; i++) {
            if (unique == 0 || leaders->values[unique - 1] != leaders->values[i]) {
                leaders->values[unique++] = leaders->values[i];
            }
        }
        leaders->length = unique;
        Py_ssize_t length = body->length;
        for (Py_ssize_t i = 0; i < unique; i++) {
            body->block_count += pairs_position(pairs, length, leaders->values[i]) >= 0;
        }
        for (Py_ssize_t i = 0; i < flow.edges.length; i++) {
            body->edge_count += pairs_position(pairs, length, flow.edges.values[i]) >= 0;
        }
        for (Py_ssize_t i = 0; i < length; i++) {
            const Record *record = &self->records[pairs[i].row];
            uint8_t kind = self->texts[record->text].kind;
            uint64_t following = record->address + record->size;
            if ((kind == KIND_PLAIN || kind == KIND_CALL) && following > record->address &&
                sorted_contains(leaders->values, unique, following) &&
                ((i + 1 < length && pairs[i + 1].address == following) ||
                 pairs_position(pairs, length, following) >= 0)) {
                body->edge_count++;
            }
        }
        body->conditional = flow.conditional.values; /* taken over */
        body->conditional_count = flow.conditional.length;
        flow.conditional.values = NULL;
        result = Py_BuildValue("(Nii)", (PyObject *)body, invalid, truncated);
    }
    PyMem_Free(pairs);
    values_free(&flow.leaders);
    values_free(&flow.edges);
    values_free(&flow.conditional);
    values_free(&flow.pending);
    PyMem_Free(trail);
    Py_XDECREF(calls);
    Py_XDECREF(tail_jumps);
    Py_XDECREF(direct_jumps);
    Py_XDECREF(called_imports);
    return result;
}

/* tail_targets(bodies, starts) -> function_starts.tail_call_targets over the table's
 * ownership: for each body (FunctionBody) and each (address, target) of its direct_jumps whose
 * target no other function owns, the target when a start in ``starts`` (sorted) lies between
 * address and target. The Python loop cost ~10 ms a heuristic round on pillow _imaging. */
static PyObject *
table_tail_targets(TableObject *self, PyObject *args)
{
    PyObject *bodies, *starts;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &bodies, &PyList_Type, &starts)) {
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(starts);
    uint64_t *sorted = PyMem_Malloc(((size_t)count + 1) * sizeof(uint64_t));
    if (sorted == NULL) {
        return PyErr_NoMemory();
    }
    int failed = 0;
    for (Py_ssize_t i = 0; i < count && !failed; i++) {
        failed = address_value(PyList_GET_ITEM(starts, i), &sorted[i]) <= 0 ||
                 (i > 0 && sorted[i] < sorted[i - 1]);
    }
    if (failed) {
        PyMem_Free(sorted);
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "starts must be sorted addresses");
        }
        return NULL;
    }
    PyObject *found = PyList_New(0);
    for (Py_ssize_t b = 0; found != NULL && b < PyList_GET_SIZE(bodies); b++) {
        PyObject *body = PyList_GET_ITEM(bodies, b);
        PyObject *start_object = PyObject_GetAttrString(body, "start");
        PyObject *jumps = start_object ? PyObject_GetAttrString(body, "direct_jumps") : NULL;
        uint64_t start = 0;
        if (jumps == NULL || !PyList_Check(jumps) || address_value(start_object, &start) <= 0) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_TypeError, "malformed function body");
            }
            Py_CLEAR(found);
        }
        for (Py_ssize_t j = 0; found != NULL && j < PyList_GET_SIZE(jumps); j++) {
            PyObject *pair = PyList_GET_ITEM(jumps, j);
            uint64_t address, target;
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 ||
                address_value(PyTuple_GET_ITEM(pair, 0), &address) <= 0 ||
                address_value(PyTuple_GET_ITEM(pair, 1), &target) <= 0) {
                if (!PyErr_Occurred()) {
                    PyErr_SetString(PyExc_TypeError, "malformed direct jump");
                }
                Py_CLEAR(found);
                break;
            }
            /* A target another function reaches by its own flow is a shared tail or a cold
             * fragment jumping home, not a function entry. */
            int64_t row = table_find(self, target);
            if (row >= 0 && self->records[row].flags & FLAG_OWNED &&
                (self->records[row].flags & FLAG_SHARED ||
                 self->owner_starts[self->records[row].owner] != start)) {
                continue;
            }
            uint64_t low = address < target ? address : target;
            uint64_t high = address < target ? target : address;
            Py_ssize_t lo = 0, hi = count; /* bisect_right(starts, low) */
            while (lo < hi) {
                Py_ssize_t middle = (lo + hi) / 2;
                if (low < sorted[middle]) {
                    hi = middle;
                } else {
                    lo = middle + 1;
                }
            }
            if (lo < count && sorted[lo] <= high &&
                PyList_Append(found, PyTuple_GET_ITEM(pair, 1)) < 0) {
                Py_CLEAR(found);
            }
        }
        Py_XDECREF(start_object);
        Py_XDECREF(jumps);
    }
    PyMem_Free(sorted);
    return found;
}

/* starts_containing(bodies, address) -> the keys of ``bodies`` (start -> FunctionBody, in
 * dict order) whose ``instructions`` hold ``address``: FunctionRecovery.reexplore_overlapping's
 * scan for a shared instruction, which in Python cost ~12 ms per call over the 19k functions
 * of cryptography _rust (0.6 s a sample). */
static PyObject *
starts_containing(PyObject *module, PyObject *args)
{
    PyObject *bodies, *address;
    if (!PyArg_ParseTuple(args, "O!O", &PyDict_Type, &bodies, &address)) {
        return NULL;
    }
    uint64_t value = 0;
    int valid = address_value(address, &value);
    PyObject *found = valid < 0 ? NULL : PyList_New(0);
    PyObject *name = PyUnicode_InternFromString("instructions");
    Py_ssize_t position = 0;
    PyObject *start, *body;
    while (found != NULL && name != NULL && PyDict_Next(bodies, &position, &start, &body)) {
        PyObject *instructions = PyObject_GetAttr(body, name);
        int inside;
        if (instructions == NULL) {
            inside = -1;
        } else if (PyObject_TypeCheck(instructions, &BodyType)) {
            inside = valid && body_position((BodyObject *)instructions, value) >= 0;
        } else {
            inside = PySequence_Contains(instructions, address);
        }
        Py_XDECREF(instructions);
        if (inside < 0 || (inside && PyList_Append(found, start) < 0)) {
            Py_CLEAR(found);
        }
    }
    Py_XDECREF(name);
    return found;
}
