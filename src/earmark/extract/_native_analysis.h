/* Instruction text analysis in C (common shapes; the rest goes to Python). Part of _native.c (one compilation unit, included once; split so each
 * part reads in one sitting). */

/* --- instruction text analysis --------------------------------------------------------------
 * The common cases of InstructionDecoder._analyse_text, done here so that a text seen for the
 * first time costs no Python call (measured: 85k new texts on pillow _imaging, ~0.45 s of
 * Python). The tables (register classes, memory sizes, end and conditional mnemonics, the
 * small-immediate limit) are handed over from disasm.py, so they have one definition. Any text
 * this code is not sure about (prefixed mnemonics, int 0x29, numbers past 64 bits, operands of
 * an unknown shape) is answered None and goes to the Python analysis, which stays the
 * reference: tests decode arbitrary bytes both ways and compare every field. */

#define ROLE_NONE 0
#define ROLE_TARGET 1
#define ROLE_FIXED_MEMORY 2
#define ROLE_RIP_MEMORY 3
#define ROLE_ADDRESS_IMMEDIATE 4
#define ROLE_LARGE_IMMEDIATE 5

/* _parse_int of a text of ``length`` bytes: 1 with sign and magnitude, 0 when not a number,
 * 2 when it is a number past 64 bits (left to Python). */
static int
parse_number(const char *text, size_t length, int *negative, uint64_t *magnitude)
{
    while (length && (*text == ' ' || *text == '\t')) {
        text++, length--;
    }
    while (length && (text[length - 1] == ' ' || text[length - 1] == '\t')) {
        length--;
    }
    *negative = length && *text == '-';
    if (*negative) {
        text++, length--;
        while (length && (*text == ' ' || *text == '\t')) {
            text++, length--;
        }
    }
    uint64_t value = 0;
    if (length >= 2 && text[0] == '0' && text[1] == 'x') {
        if (length == 2) {
            return 0;
        }
        for (size_t i = 2; i < length; i++) {
            char c = text[i];
            int nibble = c >= '0' && c <= '9'   ? c - '0'
                        : c >= 'a' && c <= 'f' ? c - 'a' + 10
                        : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                               : -1;
            if (nibble < 0) {
                return 0;
            }
            if (value >> 60) {
                return 2;
            }
            value = value << 4 | (uint64_t)nibble;
        }
    } else {
        if (length == 0) {
            return 0;
        }
        for (size_t i = 0; i < length; i++) {
            if (text[i] < '0' || text[i] > '9') {
                return 0;
            }
        }
        for (size_t i = 0; i < length; i++) {
            uint64_t decimal = (uint64_t)(text[i] - '0');
            if (value > (UINT64_MAX - decimal) / 10) {
                return 2;
            }
            value = value * 10 + decimal;
        }
    }
    *magnitude = value;
    return 1;
}

static int64_t
sign_extend(uint64_t value, int bits)
{
    if (bits == 32) {
        return (int64_t)(int32_t)(uint32_t)value;
    }
    return (int64_t)value;
}

/* Appends text to the token buffer; -1 when it would not fit (left to Python). */
static int
token_append(char *token, size_t *used, size_t capacity, const char *text, size_t length)
{
    if (*used + length + 1 > capacity) {
        return -1;
    }
    memcpy(token + *used, text, length);
    *used += length;
    token[*used] = 0;
    return 0;
}

/* The class of one operand (into ``class_text``), its role and value; 1 done, 0 left to
 * Python, -1 error. */
static int
classify_operand(TableObject *self, const char *operand, size_t length, int branch,
                 char *class_text, size_t class_capacity, int *role, uint64_t *value)
{
    size_t used = 0;
    class_text[0] = 0;
    *role = ROLE_NONE;
    *value = 0;
    const char *bracket = memchr(operand, '[', length);
    if (bracket != NULL) {
        size_t prefix_length = (size_t)(bracket - operand);
        const char *inner = bracket + 1;
        size_t inner_length = length - prefix_length - 1;
        while (inner_length && inner[inner_length - 1] == ']') {
            inner_length--;
        }
        if (memchr(inner, ']', inner_length) || memchr(inner, '[', inner_length)) {
            return 0;
        }
        const char *memory_class = "m";
        Py_ssize_t memory_class_length = 1;
        if (prefix_length) {
            const char *space = memchr(operand, ' ', prefix_length);
            size_t word = space ? (size_t)(space - operand) : prefix_length;
            const char *sized = class_map_get(&self->memory_size_map, operand, word,
                                              &memory_class_length);
            if (sized != NULL) {
                memory_class = sized;
            } else {
                memory_class_length = 1;
            }
            const char *colon = NULL;
            for (size_t i = 0; i < prefix_length; i++) {
                if (operand[i] == ':') {
                    colon = operand + i;
                }
            }
            if (colon != NULL) { /* fs:/gs: (TEB, TLS, stack cookie) stays visible */
                const char *segment = operand;
                for (const char *c = operand; c < colon; c++) {
                    if (*c == ' ') {
                        segment = c + 1;
                    }
                }
                if (token_append(class_text, &used, class_capacity, segment,
                                 (size_t)(colon - segment)) < 0 ||
                    token_append(class_text, &used, class_capacity, ":", 1) < 0) {
                    return 0;
                }
            }
        }
        if (token_append(class_text, &used, class_capacity, memory_class,
                         (size_t)memory_class_length) < 0) {
            return 0;
        }
        if (inner_length >= 3 && memcmp(inner, "rip", 3) == 0) {
            uint64_t displacement = 0;
            if (inner_length > 3) {
                char compact[64];
                size_t compact_length = 0;
                for (size_t i = 3; i < inner_length; i++) {
                    if (inner[i] != ' ') {
                        if (compact_length == sizeof compact) {
                            return 0;
                        }
                        compact[compact_length++] = inner[i];
                    }
                }
                size_t skip = 0;
                while (skip < compact_length && compact[skip] == '+') {
                    skip++;
                }
                int negative;
                uint64_t magnitude;
                if (parse_number(compact + skip, compact_length - skip, &negative, &magnitude) !=
                    1) {
                    return 0;
                }
                displacement = negative ? 0 - magnitude : magnitude;
            }
            *role = ROLE_RIP_MEMORY;
            *value = displacement;
            return token_append(class_text, &used, class_capacity, "[addr]", 6) < 0 ? 0 : 1;
        }
        int negative;
        uint64_t magnitude;
        int number = parse_number(inner, inner_length, &negative, &magnitude);
        if (number == 2) {
            return 0;
        }
        if (number == 1) {
            *role = ROLE_FIXED_MEMORY;
            *value = (negative ? 0 - magnitude : magnitude) & self->address_mask;
            return token_append(class_text, &used, class_capacity, "[addr]", 6) < 0 ? 0 : 1;
        }
        if (inner_length >= 3 &&
            (memcmp(inner, "rsp", 3) == 0 || memcmp(inner, "esp", 3) == 0 ||
             memcmp(inner, "rbp", 3) == 0 || memcmp(inner, "ebp", 3) == 0)) {
            return token_append(class_text, &used, class_capacity, "[stack]", 7) < 0 ? 0 : 1;
        }
        return 1;
    }
    Py_ssize_t register_length;
    const char *register_class =
        class_map_get(&self->register_class_map, operand, length, &register_length);
    if (register_class != NULL) {
        return token_append(class_text, &used, class_capacity, register_class,
                            (size_t)register_length) < 0
                   ? 0
                   : 1;
    }
    int negative;
    uint64_t magnitude;
    int number = parse_number(operand, length, &negative, &magnitude);
    if (number == 2) {
        return 0;
    }
    if (number == 0) { /* far pointers "0x10:0x2000" and other oddities */
        return token_append(class_text, &used, class_capacity, "other", 5) < 0 ? 0 : 1;
    }
    uint64_t raw = negative ? 0 - magnitude : magnitude;
    if (branch) {
        *role = ROLE_TARGET;
        *value = raw & self->address_mask;
        return token_append(class_text, &used, class_capacity, "addr", 4) < 0 ? 0 : 1;
    }
    int bits = self->address_mask == UINT32_MAX ? 32 : 64;
    uint64_t unsigned_value = raw & self->address_mask;
    int64_t signed_value = sign_extend(unsigned_value, bits);
    int64_t limit = self->small_limit;
    if (unsigned_value >> 32 == 0) {
        int64_t narrow = sign_extend(unsigned_value, 32);
        if (narrow > -limit && narrow < limit) {
            signed_value = narrow; /* "and eax, 0xffffffff" is -1 too */
        }
    }
    if (signed_value > -limit && signed_value < limit) {
        char printed[32];
        int written = signed_value < 0
                          ? snprintf(printed, sizeof printed, "-0x%llx",
                                     (unsigned long long)(0 - (uint64_t)signed_value))
                          : snprintf(printed, sizeof printed, "0x%llx",
                                     (unsigned long long)signed_value);
        return token_append(class_text, &used, class_capacity, printed, (size_t)written) < 0 ? 0
                                                                                           : 1;
    }
    Py_ssize_t segment = table_segment(self, unsigned_value);
    *value = unsigned_value;
    if (segment >= 0) {
        *role = ROLE_ADDRESS_IMMEDIATE;
        return token_append(class_text, &used, class_capacity, "addr", 4) < 0 ? 0 : 1;
    }
    *role = ROLE_LARGE_IMMEDIATE;
    return token_append(class_text, &used, class_capacity, "imm", 3) < 0 ? 0 : 1;
}

/* KIND_* of a mnemonic without prefixes (as _classify_mnemonic), or -2 when it has a space or
 * is "int" (left to Python); -1 error. */
static int
classify_mnemonic(TableObject *self, const char *text, size_t length, PyObject *mnemonic)
{
    if (memchr(text, ' ', length) || (length == 3 && memcmp(text, "int", 3) == 0)) {
        return -2;
    }
    int end = PySet_Contains(self->end_mnemonics, mnemonic);
    if (end != 0) {
        return end < 0 ? -1 : 4; /* KIND_END */
    }
    if (length == 3 && memcmp(text, "jmp", 3) == 0) {
        return KIND_JUMP;
    }
    if (length == 4 && memcmp(text, "call", 4) == 0) {
        return KIND_CALL;
    }
    if (length && text[0] == 'j') {
        return KIND_CONDITIONAL;
    }
    int extra = PySet_Contains(self->conditional_extra, mnemonic);
    return extra < 0 ? -1 : extra ? KIND_CONDITIONAL : KIND_PLAIN;
}

/* Most operands an instruction text has (x86 has at most four; more is left to Python). */
#define MAX_OPERANDS 8

/* A tuple of ``count`` addresses (the table's empty tuple for none), or NULL with an error. */
static PyObject *
values_tuple(TableObject *self, const uint64_t *values, int count)
{
    if (count == 0) {
        return Py_NewRef(self->no_values);
    }
    PyObject *tuple = PyTuple_New(count);
    for (int i = 0; tuple != NULL && i < count; i++) {
        PyObject *number = PyLong_FromUnsignedLongLong(values[i]);
        if (number == NULL) {
            Py_CLEAR(tuple);
            break;
        }
        PyTuple_SET_ITEM(tuple, i, number);
    }
    return tuple;
}

/* The analysis of a text (_OperandAnalysis's fields) into ``text``, with new references to its
 * mnemonic, token and immediates (op_str left NULL): 1, 0 when the text is left to the Python
 * analysis, -1 with an error. Filled in place: building the 8-field tuple and reading it back
 * cost more than the analysis. */
static int
analyse_in_c(TableObject *self, int kind, PyObject *mnemonic, const char *mnemonic_text,
             size_t mnemonic_length, const char *op_str, size_t op_str_length, Text *text)
{
    if (kind != KIND_PLAIN && op_str_length >= 2 && op_str[0] == '0' && op_str[1] == 'x' &&
        memchr(op_str, ',', op_str_length) == NULL) {
        return 0; /* a branch to a number not printed the usual way: Python's rule */
    }
    char token[512];
    size_t used = 0;
    if (token_append(token, &used, sizeof token, mnemonic_text, mnemonic_length) < 0) {
        return 0;
    }
    uint64_t address_values[MAX_OPERANDS], large_values[MAX_OPERANDS];
    int address_count = 0, large_count = 0;
    memset(text, 0, sizeof *text);
    text->kind = (uint8_t)kind;
    if (op_str_length) {
        token_append(token, &used, sizeof token, " ", 1);
        const char *operand = op_str;
        const char *end = op_str + op_str_length;
        for (int operands = 0;; operands++) {
            const char *next = operand;
            while (next < end && !(next[0] == ',' && next + 1 < end && next[1] == ' ')) {
                next++;
            }
            char class_text[128];
            int role;
            uint64_t value;
            int done = operands < MAX_OPERANDS
                           ? classify_operand(self, operand, (size_t)(next - operand),
                                              kind != KIND_PLAIN, class_text,
                                              sizeof class_text, &role, &value)
                           : 0;
            if (done <= 0) {
                return done;
            }
            if ((operands && token_append(token, &used, sizeof token, ",", 1) < 0) ||
                token_append(token, &used, sizeof token, class_text, strlen(class_text)) < 0) {
                return 0;
            }
            if (role == ROLE_TARGET) {
                text->target = value, text->has_target = 1;
            } else if (role == ROLE_FIXED_MEMORY) {
                text->memory = value, text->memory_kind = 1;
            } else if (role == ROLE_RIP_MEMORY) {
                text->memory = value, text->memory_kind = 2; /* mod 2**64, see record_memory */
            } else if (role == ROLE_ADDRESS_IMMEDIATE) {
                address_values[address_count++] = value;
            } else if (role == ROLE_LARGE_IMMEDIATE) {
                large_values[large_count++] = value;
            }
            if (next >= end) {
                break;
            }
            operand = next + 2;
        }
    }
    int64_t token_name = names_index(&self->names, token, used);
    if (token_name < 0) {
        return -1;
    }
    text->address_immediates = values_tuple(self, address_values, address_count);
    text->large_immediates =
        text->address_immediates ? values_tuple(self, large_values, large_count) : NULL;
    if (text->large_immediates == NULL) {
        Py_XDECREF(text->address_immediates);
        return -1;
    }
    text->mnemonic = Py_NewRef(mnemonic);
    text->token = Py_NewRef(self->names.objects[token_name]);
    return 1;
}
