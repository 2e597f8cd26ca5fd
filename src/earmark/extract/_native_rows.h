/* Finding and adding the rows of the instruction table: the segment lookups, the direct map
 * of code addresses and the hash for the rest (see "Where the row of an address is kept" in
 * _native.c). Part of _native.c (one compilation unit, included once, after the table's
 * type); kept in its own file so each part reads in one sitting. */

/* Index of the segment holding ``address`` as disasm.InstructionDecoder.segment_at finds it
 * (the last one starting at or below it, if it reaches that far), or -1. */
static Py_ssize_t
table_segment(TableObject *self, uint64_t address)
{
    Py_ssize_t low = 0, high = self->segment_count; /* bisect_right over the starts */
    while (low < high) {
        Py_ssize_t middle = (low + high) / 2;
        if (address < self->segment_starts[middle]) {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    Py_ssize_t index = low - 1;
    if (index < 0 || address - self->segment_starts[index] >= self->segment_lengths[index]) {
        return -1;
    }
    return index;
}

static inline int
table_is_code(TableObject *self, uint64_t address)
{
    Py_ssize_t index = table_segment(self, address);
    return index >= 0 && self->segment_executable[index];
}

/* The executable segment holding ``address`` (table_segment's answer), or -1. */
static inline Py_ssize_t
code_segment(TableObject *self, uint64_t address)
{
    Py_ssize_t last = self->last_segment;
    if (self->disjoint_segments && last >= 0 &&
        address - self->segment_starts[last] < self->segment_lengths[last]) {
        return last; /* most lookups stay in the segment of the one before */
    }
    Py_ssize_t index = table_segment(self, address);
    if (index < 0 || !self->segment_executable[index]) {
        return -1;
    }
    self->last_segment = index;
    return index;
}

/* Fibonacci hashing: the top bits of address * 2**64/phi spread nearby addresses evenly. */
static inline size_t
address_slot(uint64_t address, int shift)
{
    return (size_t)((address * 0x9E3779B97F4A7C15ULL) >> shift);
}

/* Row of ``address`` outside executable segments, or -1; ``*empty`` (when not NULL) is the
 * slot where it would go. */
static int64_t
slots_probe(const TableObject *self, uint64_t address, size_t *empty)
{
    size_t mask = self->slot_capacity - 1;
    uint32_t tag = (uint32_t)address;
    for (size_t i = address_slot(address, self->slot_shift);; i = (i + 1) & mask) {
        AddressSlot slot = self->slots[i];
        if (slot.row == 0) {
            if (empty != NULL) {
                *empty = i;
            }
            return -1;
        }
        if (slot.tag == tag && self->records[slot.row - 1].address == address) {
            return slot.row - 1;
        }
    }
}

/* Row of ``address``, or -1. */
static inline int64_t
table_find(TableObject *self, uint64_t address)
{
    Py_ssize_t segment = code_segment(self, address);
    if (segment < 0) {
        return slots_probe(self, address, NULL);
    }
    uint64_t offset = address - self->segment_starts[segment];
    uint32_t block = self->granules[segment][offset >> CODE_GRANULE_BITS];
    if (block == 0) {
        return -1;
    }
    size_t cell = ((size_t)(block - 1) << CODE_GRANULE_BITS) | (offset & (CODE_GRANULE - 1));
    return (int64_t)self->cells[cell] - 1;
}

/* The cell of ``address`` in executable segment ``segment``, its block made if new; NULL with
 * MemoryError. */
static uint32_t *
table_cell(TableObject *self, Py_ssize_t segment, uint64_t address)
{
    uint64_t offset = address - self->segment_starts[segment];
    uint32_t *block = &self->granules[segment][offset >> CODE_GRANULE_BITS];
    if (*block == 0) {
        if (self->block_count == UINT32_MAX - 1) {
            PyErr_SetString(PyExc_MemoryError, "instruction table full");
            return NULL;
        }
        if (self->block_count == self->block_capacity) {
            size_t capacity = self->block_capacity ? self->block_capacity * 2 : 1024;
            capacity = capacity < self->block_limit ? capacity : self->block_limit;
            uint32_t *cells =
                PyMem_Realloc(self->cells, capacity * CODE_GRANULE * sizeof(uint32_t));
            if (cells == NULL) {
                PyErr_NoMemory();
                return NULL;
            }
            self->cells = cells;
            self->block_capacity = capacity;
        }
        memset(self->cells + self->block_count * CODE_GRANULE, 0, CODE_GRANULE * sizeof(uint32_t));
        *block = (uint32_t)++self->block_count;
    }
    return &self->cells[((size_t)(*block - 1) << CODE_GRANULE_BITS) | (offset & (CODE_GRANULE - 1))];
}

/* Puts ``row`` of an address outside executable segments into the hash; 0, or -1 with
 * MemoryError. */
static int
slots_insert(TableObject *self, uint64_t address, uint32_t row)
{
    if (2 * (self->slot_used + 1) > self->slot_capacity) {
        size_t capacity = self->slot_capacity * 2;
        int shift = self->slot_shift - 1;
        AddressSlot *slots = PyMem_Calloc(capacity, sizeof(AddressSlot));
        if (slots == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (size_t i = 0; i < self->slot_capacity; i++) {
            AddressSlot slot = self->slots[i];
            if (slot.row != 0) {
                size_t j = address_slot(self->records[slot.row - 1].address, shift);
                while (slots[j].row != 0) {
                    j = (j + 1) & (capacity - 1);
                }
                slots[j] = slot;
            }
        }
        PyMem_Free(self->slots);
        self->slots = slots;
        self->slot_capacity = capacity;
        self->slot_shift = shift;
    }
    size_t slot = 0;
    if (slots_probe(self, address, &slot) >= 0) { /* callers add only absent addresses */
        PyErr_SetString(PyExc_RuntimeError, "instruction table: address added twice");
        return -1;
    }
    self->slots[slot].tag = (uint32_t)address;
    self->slots[slot].row = row + 1;
    self->slot_used++;
    return 0;
}

/* A new row for ``address`` (not present), or -1 with MemoryError. */
static int64_t
table_append(TableObject *self, uint64_t address)
{
    if (self->count == UINT32_MAX - 1) {
        PyErr_SetString(PyExc_MemoryError, "instruction table full");
        return -1;
    }
    if (self->count == self->capacity) {
        uint32_t capacity = self->capacity ? self->capacity * 2 : 4096;
        Record *records = PyMem_Realloc(self->records, (size_t)capacity * sizeof(Record));
        if (records == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->records = records;
        self->capacity = capacity;
    }
    uint32_t row = self->count;
    Py_ssize_t segment = code_segment(self, address);
    if (segment >= 0) {
        uint32_t *cell = table_cell(self, segment, address);
        if (cell == NULL) {
            return -1;
        }
        *cell = row + 1;
    } else if (slots_insert(self, address, row) < 0) {
        return -1;
    }
    self->count++;
    Record *record = &self->records[row];
    memset(record, 0, sizeof *record);
    record->address = address;
    return row;
}
