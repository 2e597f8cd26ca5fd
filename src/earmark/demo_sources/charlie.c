/* Demo program "charlie" (actor unknown): the "WannaCry-like" case.
 *
 * Most of its code is its own (a small integer expression calculator and a text-adventure
 * state machine) plus the statically linked zlib, but it is linked with alpha_core.c, so it
 * carries exactly four of alpha's rare routines: alpha_cipher_key_schedule,
 * alpha_cipher_encrypt_block, alpha_hash_name and alpha_deobfuscate_string. A correct
 * attribution reports that shared rare code (a link to "Group A") without claiming that
 * charlie IS alpha.
 * Benign: no network, files or processes; a deterministic self-test prints a checksum.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

#include "alpha_core.h"
#include "zlib.h"

#define CHARLIE_VARIABLES 8
#define CHARLIE_ROOMS 4
#define CHARLIE_ITEMS 3

/* ---- integer expression calculator ------------------------------------------------------ */

typedef enum { TOKEN_END, TOKEN_NUMBER, TOKEN_NAME, TOKEN_OPERATOR, TOKEN_ERROR } charlie_token_kind;

typedef struct {
    const char *cursor;
    charlie_token_kind kind;
    int32_t number;
    char name[16];
    char op;
    int failed;
} charlie_lexer;

typedef struct {
    char names[CHARLIE_VARIABLES][16];
    int32_t values[CHARLIE_VARIABLES];
    int count;
} charlie_variables;

int32_t charlie_parse_comparison(charlie_lexer *lexer, charlie_variables *variables);

void charlie_lexer_next(charlie_lexer *lexer)
{
    while (*lexer->cursor == ' ') {
        lexer->cursor++;
    }
    if (*lexer->cursor == '\0') {
        lexer->kind = TOKEN_END;
    } else if (*lexer->cursor >= '0' && *lexer->cursor <= '9') {
        int32_t value = 0;
        while (*lexer->cursor >= '0' && *lexer->cursor <= '9' && value < 100000000) {
            value = value * 10 + (*lexer->cursor++ - '0');
        }
        lexer->kind = TOKEN_NUMBER;
        lexer->number = value;
    } else if ((*lexer->cursor >= 'a' && *lexer->cursor <= 'z') || *lexer->cursor == '_') {
        size_t length = 0;
        while (((*lexer->cursor >= 'a' && *lexer->cursor <= 'z') || *lexer->cursor == '_')
               && length + 1 < sizeof lexer->name) {
            lexer->name[length++] = *lexer->cursor++;
        }
        lexer->name[length] = '\0';
        lexer->kind = TOKEN_NAME;
    } else if (strchr("+-*/%^()<>=,", *lexer->cursor) != NULL) {
        lexer->kind = TOKEN_OPERATOR;
        lexer->op = *lexer->cursor++;
    } else {
        lexer->kind = TOKEN_ERROR;
        lexer->failed = 1;
    }
}

int charlie_variable_find(const charlie_variables *variables, const char *name)
{
    int index;

    for (index = 0; index < variables->count; index++) {
        if (strcmp(variables->names[index], name) == 0) {
            return index;
        }
    }
    return -1;
}

void charlie_variable_assign(charlie_variables *variables, const char *name, int32_t value)
{
    int index = charlie_variable_find(variables, name);

    if (index < 0 && variables->count < CHARLIE_VARIABLES) {
        index = variables->count++;
        strncpy(variables->names[index], name, sizeof variables->names[index] - 1);
    }
    if (index >= 0) {
        variables->values[index] = value;
    }
}

int32_t charlie_greatest_common_divisor(int32_t first, int32_t second)
{
    first = first < 0 ? -first : first;
    second = second < 0 ? -second : second;
    while (second != 0) {
        int32_t rest = first % second;
        first = second;
        second = rest;
    }
    return first;
}

int32_t charlie_integer_sqrt(int32_t value)
{
    int32_t root = 0;
    int32_t bit = 1 << 30;

    if (value <= 0) {
        return 0;
    }
    while (bit > value) {
        bit >>= 2;
    }
    while (bit != 0) {
        if (value >= root + bit) {
            value -= root + bit;
            root = (root >> 1) + bit;
        } else {
            root >>= 1;
        }
        bit >>= 2;
    }
    return root;
}

int32_t charlie_call_builtin(charlie_lexer *lexer, charlie_variables *variables, const char *name)
{
    int32_t first;
    int32_t second = 0;

    charlie_lexer_next(lexer);
    first = charlie_parse_comparison(lexer, variables);
    if (lexer->kind == TOKEN_OPERATOR && lexer->op == ',') {
        charlie_lexer_next(lexer);
        second = charlie_parse_comparison(lexer, variables);
    }
    if (lexer->kind != TOKEN_OPERATOR || lexer->op != ')') {
        lexer->failed = 1;
        return 0;
    }
    charlie_lexer_next(lexer);
    if (strcmp(name, "gcd") == 0) {
        return charlie_greatest_common_divisor(first, second);
    }
    if (strcmp(name, "sqrt") == 0) {
        return charlie_integer_sqrt(first);
    }
    if (strcmp(name, "max") == 0) {
        return first > second ? first : second;
    }
    lexer->failed = 1;
    return 0;
}

int32_t charlie_parse_primary(charlie_lexer *lexer, charlie_variables *variables)
{
    int32_t value = 0;

    if (lexer->kind == TOKEN_NUMBER) {
        value = lexer->number;
        charlie_lexer_next(lexer);
    } else if (lexer->kind == TOKEN_NAME) {
        char name[16];
        memcpy(name, lexer->name, sizeof name);
        charlie_lexer_next(lexer);
        if (lexer->kind == TOKEN_OPERATOR && lexer->op == '(') {
            return charlie_call_builtin(lexer, variables, name);
        }
        if (charlie_variable_find(variables, name) < 0) {
            lexer->failed = 1;
            return 0;
        }
        value = variables->values[charlie_variable_find(variables, name)];
    } else if (lexer->kind == TOKEN_OPERATOR && lexer->op == '(') {
        charlie_lexer_next(lexer);
        value = charlie_parse_comparison(lexer, variables);
        if (lexer->kind != TOKEN_OPERATOR || lexer->op != ')') {
            lexer->failed = 1;
        }
        charlie_lexer_next(lexer);
    } else {
        lexer->failed = 1;
    }
    return value;
}

int32_t charlie_parse_unary(charlie_lexer *lexer, charlie_variables *variables)
{
    if (lexer->kind == TOKEN_OPERATOR && lexer->op == '-') {
        charlie_lexer_next(lexer);
        return -charlie_parse_unary(lexer, variables);
    }
    return charlie_parse_primary(lexer, variables);
}

int32_t charlie_parse_power(charlie_lexer *lexer, charlie_variables *variables)
{
    int32_t base = charlie_parse_unary(lexer, variables);

    if (lexer->kind == TOKEN_OPERATOR && lexer->op == '^') {
        int32_t exponent;
        int32_t result = 1;
        charlie_lexer_next(lexer);
        exponent = charlie_parse_power(lexer, variables);
        /* Capped so the demo never overflows, whatever the script says. */
        while (exponent-- > 0 && result < 1000000 && result > -1000000) {
            result *= base;
        }
        return result;
    }
    return base;
}

int32_t charlie_parse_term(charlie_lexer *lexer, charlie_variables *variables)
{
    int32_t value = charlie_parse_power(lexer, variables);

    while (lexer->kind == TOKEN_OPERATOR && (lexer->op == '*' || lexer->op == '/' || lexer->op == '%')) {
        char op = lexer->op;
        int32_t right;
        charlie_lexer_next(lexer);
        right = charlie_parse_power(lexer, variables);
        if (op == '*') {
            value *= right;
        } else if (right == 0) {
            lexer->failed = 1;
        } else if (op == '/') {
            value /= right;
        } else {
            value %= right;
        }
    }
    return value;
}

int32_t charlie_parse_sum(charlie_lexer *lexer, charlie_variables *variables)
{
    int32_t value = charlie_parse_term(lexer, variables);

    while (lexer->kind == TOKEN_OPERATOR && (lexer->op == '+' || lexer->op == '-')) {
        char op = lexer->op;
        charlie_lexer_next(lexer);
        value = op == '+' ? value + charlie_parse_term(lexer, variables)
                          : value - charlie_parse_term(lexer, variables);
    }
    return value;
}

int32_t charlie_parse_comparison(charlie_lexer *lexer, charlie_variables *variables)
{
    int32_t value = charlie_parse_sum(lexer, variables);

    while (lexer->kind == TOKEN_OPERATOR && (lexer->op == '<' || lexer->op == '>')) {
        char op = lexer->op;
        int32_t right;
        charlie_lexer_next(lexer);
        right = charlie_parse_sum(lexer, variables);
        value = op == '<' ? value < right : value > right;
    }
    return value;
}

/* "name = expression" assigns; a bare expression is evaluated. Returns 0 on success. */
int charlie_evaluate(const char *line, charlie_variables *variables, int32_t *result)
{
    charlie_lexer lexer;
    const char *equals = strchr(line, '=');

    memset(&lexer, 0, sizeof lexer);
    lexer.cursor = equals != NULL ? equals + 1 : line;
    charlie_lexer_next(&lexer);
    *result = charlie_parse_comparison(&lexer, variables);
    if (lexer.failed || lexer.kind != TOKEN_END) {
        return -1;
    }
    if (equals != NULL) {
        char name[16];
        size_t length = 0;
        while (line + length < equals && line[length] != ' ' && length + 1 < sizeof name) {
            name[length] = line[length];
            length++;
        }
        name[length] = '\0';
        charlie_variable_assign(variables, name, *result);
    }
    return 0;
}

/* ---- text adventure ---------------------------------------------------------------------- */

typedef enum { VERB_NONE, VERB_NORTH, VERB_SOUTH, VERB_EAST, VERB_WEST, VERB_TAKE, VERB_DROP,
               VERB_LOOK, VERB_OPEN, VERB_SAVE, VERB_CALC } charlie_verb;

typedef struct {
    int room;
    int carrying[CHARLIE_ITEMS];
    int item_room[CHARLIE_ITEMS];
    int door_open;
    int moves;
    uint32_t transcript;
    charlie_variables variables;
} charlie_world;

/* Room descriptions are kept obfuscated with alpha's string routine, as the tool's author did. */
static const uint8_t charlie_room_vault[] = {
    0x64, 0x66, 0x4A, 0x86, 0x66, 0xAA, 0x15, 0x1D, 0x45, 0x0A, 0xE5, 0x74, 0xB7, 0xBA, 0xC9, 0x33,
    0xFA, 0xB5, 0x04, 0x08, 0x74, 0x3E, 0x25, 0x45, 0xEF, 0x45, 0x08, 0xD8, 0x05, 0x3C, 0x11, 0x5B,
    0x68, 0x49, 0x2E, 0x1C, 0xD4, 0x54, 0x6F, 0xD7, 0x87, 0x96, 0x67, 0x74,
};
static const uint8_t charlie_room_corridor[] = {
    0xA4, 0xDC, 0x58, 0xF8, 0xEC, 0x26, 0xDD, 0x97, 0xE5, 0x4C, 0xB3, 0xE6, 0x79, 0xC4, 0x19, 0xB3,
    0x6A, 0x7D, 0x14, 0x68, 0xCC, 0x4E, 0xEF, 0x95, 0x8F, 0x4E, 0x37, 0xBE, 0xDB,
};
static const uint8_t charlie_room_archive[] = {
    0x0C, 0x26, 0xF2, 0x56, 0x06, 0xAA, 0x25, 0x4F, 0x47, 0x0E, 0x9F, 0x24, 0x37, 0x68, 0xE9, 0x3B,
    0x38, 0xA1, 0xD6, 0x96, 0x3E, 0xDA, 0xC5, 0x57, 0xFD, 0x2C, 0xDB, 0xFC, 0x57, 0x08, 0x19, 0x93,
    0x80,
};
static const uint8_t charlie_room_machine[] = {
    0x64, 0x66, 0x4A, 0x86, 0x2E, 0xCA, 0x6D, 0x8F, 0x7D, 0xF4, 0xE3, 0x66, 0xD3, 0x12, 0x69, 0xAB,
    0x18, 0x11, 0x6E, 0xAE, 0xC6, 0xCA, 0x9F, 0xDD, 0x6F, 0xB6, 0xE5, 0x14, 0xDD, 0xC4, 0x89, 0xC3,
    0xDA, 0xD7, 0x9C,
};

static const struct {
    const uint8_t *description;
    size_t length;
    int exits[4]; /* north, south, east, west; -1 = wall */
} charlie_rooms[CHARLIE_ROOMS] = {
    {charlie_room_vault, sizeof charlie_room_vault, {1, -1, -1, -1}},
    {charlie_room_corridor, sizeof charlie_room_corridor, {3, 0, 2, -1}},
    {charlie_room_archive, sizeof charlie_room_archive, {-1, -1, -1, 1}},
    {charlie_room_machine, sizeof charlie_room_machine, {-1, 1, -1, -1}},
};

static const char *const charlie_item_names[CHARLIE_ITEMS] = {"lamp", "key", "ledger"};

/* Verbs are matched by alpha_hash_name of the word, reused from Group A's code. */
static const struct {
    uint32_t hash;
    charlie_verb verb;
} charlie_verb_table[] = {
    {0x6E04CFE4u, VERB_NORTH}, {0x1C6559C8u, VERB_SOUTH}, {0x95414A41u, VERB_EAST},
    {0x4D970C4Au, VERB_WEST},  {0x4589D382u, VERB_TAKE},  {0x747AB11Au, VERB_DROP},
    {0x2DA693D8u, VERB_LOOK},  {0x9FFCBA8Cu, VERB_OPEN},  {0x26BC3193u, VERB_SAVE},
    {0xF693D79Au, VERB_CALC},
};

charlie_verb charlie_verb_lookup(const char *word)
{
    uint32_t hash = alpha_hash_name(word);
    size_t index;

    for (index = 0; index < sizeof charlie_verb_table / sizeof charlie_verb_table[0]; index++) {
        if (charlie_verb_table[index].hash == hash) {
            return charlie_verb_table[index].verb;
        }
    }
    return VERB_NONE;
}

size_t charlie_describe_room(const charlie_world *world, char *out, size_t capacity)
{
    size_t length = alpha_deobfuscate_string(charlie_rooms[world->room].description,
                                             charlie_rooms[world->room].length, out, capacity);
    int item;

    for (item = 0; item < CHARLIE_ITEMS; item++) {
        if (world->item_room[item] == world->room && !world->carrying[item] && length + 24 < capacity) {
            length += (size_t)snprintf(out + length, capacity - length, " There is a %s here.",
                                       charlie_item_names[item]);
        }
    }
    return length;
}

int charlie_move(charlie_world *world, int direction)
{
    int target = charlie_rooms[world->room].exits[direction];

    if (target < 0) {
        return -1;
    }
    if (target == 3 && !world->door_open) {
        return -2;
    }
    world->room = target;
    world->moves++;
    return 0;
}

int charlie_find_item(const char *name)
{
    int item;

    for (item = 0; item < CHARLIE_ITEMS; item++) {
        if (strcmp(charlie_item_names[item], name) == 0) {
            return item;
        }
    }
    return -1;
}

int charlie_take_or_drop(charlie_world *world, const char *name, int take)
{
    int item = charlie_find_item(name);

    if (item < 0) {
        return -1;
    }
    if (take) {
        if (world->item_room[item] != world->room || world->carrying[item]) {
            return -1;
        }
        world->carrying[item] = 1;
    } else {
        if (!world->carrying[item]) {
            return -1;
        }
        world->carrying[item] = 0;
        world->item_room[item] = world->room;
    }
    return 0;
}

/* Serialise, compress with zlib and encrypt the world with alpha's block cipher. */
size_t charlie_save_world(const charlie_world *world, uint8_t *out, size_t capacity)
{
    alpha_cipher_ctx cipher;
    uint8_t plain[64];
    uint8_t chain[ALPHA_BLOCK_BYTES];
    uLongf packed = (uLongf)(capacity > 4 ? capacity - 4 : 0);
    size_t length = 0;
    size_t offset;
    int item;
    static const uint8_t save_key[] = "charlie-save-slot";

    plain[length++] = (uint8_t)world->room;
    plain[length++] = (uint8_t)world->door_open;
    plain[length++] = (uint8_t)world->moves;
    for (item = 0; item < CHARLIE_ITEMS; item++) {
        plain[length++] = (uint8_t)(world->carrying[item] << 4 | (world->item_room[item] & 0x0F));
    }
    for (item = 0; item < world->variables.count && length + 4 <= sizeof plain; item++) {
        uint32_t value = (uint32_t)world->variables.values[item];
        plain[length++] = (uint8_t)value;
        plain[length++] = (uint8_t)(value >> 8);
        plain[length++] = (uint8_t)(value >> 16);
        plain[length++] = (uint8_t)(value >> 24);
    }
    if (packed == 0 || compress(out + 4, &packed, plain, (uLong)length) != Z_OK) {
        return 0;
    }
    alpha_cipher_key_schedule(&cipher, save_key, sizeof save_key - 1);
    memset(chain, 0x3C, sizeof chain);
    for (offset = 0; offset < packed; offset++) {
        if (offset % ALPHA_BLOCK_BYTES == 0) {
            alpha_cipher_encrypt_block(&cipher, chain);
        }
        out[4 + offset] ^= chain[offset % ALPHA_BLOCK_BYTES];
    }
    out[0] = 'C';
    out[1] = 'S';
    out[2] = (uint8_t)packed;
    out[3] = (uint8_t)(crc32(0L, out + 4, (uInt)packed) & 0xFFu);
    return (size_t)packed + 4;
}

int charlie_run_command(charlie_world *world, const char *line, char *reply, size_t capacity)
{
    char verb_word[16];
    const char *argument = strchr(line, ' ');
    size_t verb_length = argument != NULL ? (size_t)(argument - line) : strlen(line);
    int32_t value = 0;
    int status = 0;

    if (verb_length >= sizeof verb_word) {
        return -1;
    }
    memcpy(verb_word, line, verb_length);
    verb_word[verb_length] = '\0';
    argument = argument != NULL ? argument + 1 : "";
    switch (charlie_verb_lookup(verb_word)) {
    case VERB_NORTH:
    case VERB_SOUTH:
    case VERB_EAST:
    case VERB_WEST:
        status = charlie_move(world, (int)charlie_verb_lookup(verb_word) - (int)VERB_NORTH);
        snprintf(reply, capacity, status == 0 ? "You go." : "You cannot go that way.");
        break;
    case VERB_TAKE:
    case VERB_DROP:
        status = charlie_take_or_drop(world, argument, charlie_verb_lookup(verb_word) == VERB_TAKE);
        snprintf(reply, capacity, status == 0 ? "Done." : "You cannot.");
        break;
    case VERB_LOOK:
        charlie_describe_room(world, reply, capacity);
        break;
    case VERB_OPEN:
        world->door_open = world->carrying[1] && world->room == 1;
        snprintf(reply, capacity, world->door_open ? "The door swings open." : "It is locked.");
        break;
    case VERB_SAVE: {
        uint8_t saved[128];
        size_t saved_length = charlie_save_world(world, saved, sizeof saved);
        snprintf(reply, capacity, "saved %lu bytes %08lx", (unsigned long)saved_length,
                 (unsigned long)crc32(0L, saved, (uInt)saved_length));
        break;
    }
    case VERB_CALC:
        status = charlie_evaluate(argument, &world->variables, &value);
        snprintf(reply, capacity, status == 0 ? "= %ld" : "error %ld", (long)value);
        break;
    default:
        snprintf(reply, capacity, "I do not understand.");
        status = -1;
        break;
    }
    world->transcript = (uint32_t)crc32(world->transcript, (const Bytef *)reply, (uInt)strlen(reply));
    return status;
}

static const char *const charlie_selftest_script[] = {
    "look", "north", "east", "take ledger", "look", "west", "take key", "north", "open",
    "north", "look", "calc x = 6 * 7", "calc y = x ^ 2 - gcd(84, 36)", "calc sqrt(y) + max(3, x % 5)",
    "calc (x > 40) + (y < 10)", "drop ledger", "look", "south", "south", "take lamp", "save",
    "dance", "calc 1 / 0",
};

int main(void)
{
    static charlie_world world;
    char reply[256];
    size_t step;
    int failures = 0;

    world.item_room[0] = 0;
    world.item_room[1] = 1;
    world.item_room[2] = 2;
    for (step = 0; step < sizeof charlie_selftest_script / sizeof charlie_selftest_script[0]; step++) {
        if (charlie_run_command(&world, charlie_selftest_script[step], reply, sizeof reply) != 0) {
            failures++;
        }
    }
    /* The script contains exactly three commands that must fail: a locked door, "dance",
     * and a division by zero. */
    if (failures != 3) {
        printf("charlie selftest failed: %d failures\n", failures);
        return 1;
    }
    printf("charlie selftest ok room=%d moves=%d checksum=%08lx\n", world.room, world.moves,
           (unsigned long)world.transcript);
    return 0;
}
