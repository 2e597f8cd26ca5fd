/* Demo family "alpha" (actor "Group A"); version chosen with -DALPHA_VERSION=1, 2 or 3.
 *
 * Benign: it never touches the network, files or other processes. It runs a deterministic
 * self-test on built-in data (decode its configuration, build a fake handshake, dispatch a
 * script of commands over in-memory buffers) and prints a checksum.
 *
 * How the code evolves (the truth the demo corpus documents in docs/demo-corpus.md):
 *   v1 -> v2: alpha_legacy_xor_encode removed; alpha_base64_decode added and the config
 *             decoder moves from base32 to base64 with a magic header; two commands added;
 *             the suite table gains flags.
 *   v2 -> v3: alpha_jitter_schedule added; the handshake carries an extension record; the
 *             session-key derivation gains a round; two commands added.
 * The routines in alpha_core.c never change: they are the rare core shared with "charlie".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alpha_core.h"
#include "zlib.h"

#ifndef ALPHA_VERSION
#define ALPHA_VERSION 1
#endif
#if ALPHA_VERSION < 1 || ALPHA_VERSION > 3
#error "ALPHA_VERSION must be 1, 2 or 3"
#endif

#define ALPHA_SUITE_COUNT 75
#define ALPHA_REPLY_BYTES 2048
#define ALPHA_STORE_BYTES 512

typedef struct {
    uint16_t id;
    uint8_t strength;
    uint8_t flags;
} alpha_suite;

typedef struct {
    unsigned long implant_id;
    unsigned long sleep_seconds;
    unsigned long jitter_percent;
    unsigned long port;
    char mark[16];
    char host[48];
} alpha_config;

typedef struct {
    alpha_cipher_ctx cipher;
    alpha_config config;
    uint8_t session_key[16];
    uint8_t store[ALPHA_STORE_BYTES];
    size_t store_len;
    uint32_t counter;
    uint32_t checksum;
} alpha_state;

enum alpha_command {
    ALPHA_CMD_UNKNOWN = 0,
    ALPHA_CMD_BEACON,
    ALPHA_CMD_SLEEP,
    ALPHA_CMD_ECHO,
    ALPHA_CMD_SYSINFO,
    ALPHA_CMD_STORE,
    ALPHA_CMD_FETCH,
    ALPHA_CMD_PACK,
    ALPHA_CMD_CHECKSUM,
    ALPHA_CMD_REKEY,
    ALPHA_CMD_SUITES,
    ALPHA_CMD_JITTER,
    ALPHA_CMD_SELFCHECK
};

/* Commands are looked up by alpha_hash_name of their name, never by the name itself. */
static const struct {
    uint32_t name_hash;
    enum alpha_command command;
} alpha_command_table[] = {
    {0xFA4BE86Eu, ALPHA_CMD_BEACON},   {0x2CFAC175u, ALPHA_CMD_SLEEP},
    {0xAC2BA64Au, ALPHA_CMD_ECHO},     {0x8FD3E6BFu, ALPHA_CMD_SYSINFO},
    {0x60E094B0u, ALPHA_CMD_STORE},    {0xD2C0F329u, ALPHA_CMD_FETCH},
    {0x3AC902B6u, ALPHA_CMD_PACK},     {0x87A04E82u, ALPHA_CMD_CHECKSUM},
#if ALPHA_VERSION >= 2
    {0x1C09B2E4u, ALPHA_CMD_REKEY},    {0xFE7D930Cu, ALPHA_CMD_SUITES},
#endif
#if ALPHA_VERSION >= 3
    {0xBF32C52Du, ALPHA_CMD_JITTER},   {0x0213A301u, ALPHA_CMD_SELFCHECK},
#endif
};

static const uint8_t alpha_encoded_beacon[] = {
    0x94, 0x7E, 0x62, 0xAC, 0xB4, 0x3C, 0x76, 0xFA, 0x15, 0x0A, 0x87, 0x4E, 0x99, 0xF4,
};
static const uint8_t alpha_encoded_sysinfo[] = {
    0x35, 0x85, 0x4E, 0x2C, 0xE4, 0xB6, 0x9D, 0x7D, 0x5F, 0xEC, 0x3B, 0x1E, 0xE1, 0x56, 0x1F, 0xA3,
    0xA2, 0xBF, 0x14, 0x22, 0x28, 0xAE, 0x0D, 0x45, 0x25, 0xF2, 0x25, 0x54, 0x95, 0xE4, 0xA1,
};

static const char alpha_base32_alphabet[] = "QAZ2WSX3EDC4RFV5TGB6YHN7UJM8KLP9";
#if ALPHA_VERSION >= 2
static const char alpha_base64_alphabet[] =
    "XRgslji6m2aJ4PcWyLt1kdFxwTUpv0YVI/fCu3NE9Qo7Ze5hAzKHqrDS8BbnMGO+";
#endif

#if ALPHA_VERSION == 1
static const char alpha_config_blob[] =
    "J8DWVNPN67X6FXZPH554CLV2DS5LC2JX6F3GBU6BULKYX368PA9WEY675BC9WUBKZ9D5RZ7U4TBKDW2T4VRUPLEU3B6T";
#elif ALPHA_VERSION == 2
static const char alpha_config_blob[] =
    "ykZMdtWo666MNOr1Cbnz57yWdEtluf6MnfzQbVwMV46b1dk+yz9nZ3PxBrKCvbdSEF/+c8lN6NfkCpVvMJ4HklxmqNI1LX";
#else
static const char alpha_config_blob[] =
    "yk5LOWH23dKV2FLNccrm+n0n4O37PQg6qe5j8JBjWhQCXlIv18dMP48re4D7abNfiVBdFOBPzxWOpA92NtSUfT5Z20Xk"
    "+FFA+eEPyyuy5TeT";
#endif

void alpha_cipher_crypt_ctr(const alpha_cipher_ctx *ctx, uint32_t nonce, uint8_t *data, size_t length)
{
    uint8_t keystream[ALPHA_BLOCK_BYTES];
    uint32_t block_index = 0;
    size_t offset;

    for (offset = 0; offset < length; offset++) {
        if (offset % ALPHA_BLOCK_BYTES == 0) {
            memset(keystream, 0xA5, sizeof keystream);
            keystream[0] = (uint8_t)block_index;
            keystream[1] = (uint8_t)(block_index >> 8);
            keystream[2] = (uint8_t)(block_index >> 16);
            keystream[3] = (uint8_t)(block_index >> 24);
            keystream[8] = (uint8_t)nonce;
            keystream[9] = (uint8_t)(nonce >> 8);
            keystream[10] = (uint8_t)(nonce >> 16);
            keystream[11] = (uint8_t)(nonce >> 24);
            alpha_cipher_encrypt_block(ctx, keystream);
            block_index++;
        }
        data[offset] ^= keystream[offset % ALPHA_BLOCK_BYTES];
    }
}

void alpha_session_key_derive(unsigned long implant_id, uint32_t seed, uint8_t key[16])
{
    uint32_t mix = (uint32_t)implant_id * 0x9E3779B1u ^ seed;
    unsigned index;

    for (index = 0; index < 16; index++) {
        mix ^= mix << 13;
        mix ^= mix >> 17;
        mix ^= mix << 5;
        key[index] = (uint8_t)(mix ^ (mix >> 11) ^ 0x4Du);
    }
#if ALPHA_VERSION >= 3
    /* v3: a second pass so keys of neighbouring implant ids differ in every byte. */
    for (index = 0; index < 16; index++) {
        key[index] = (uint8_t)(key[index] + key[(index + 5) & 15u] * 0x3Bu + 0x71u);
    }
#endif
}

void alpha_suite_table_fill(alpha_suite suites[ALPHA_SUITE_COUNT])
{
    unsigned index;

    suites[0].id = 0xC035;
    suites[1].id = 0xCC2F;
    suites[2].id = 0x1354;
    suites[3].id = 0xC020;
    suites[4].id = 0xC071;
    suites[5].id = 0x1375;
    suites[6].id = 0x0146;
    suites[7].id = 0xCC9E;
    suites[8].id = 0xC06E;
    suites[9].id = 0x1373;
    suites[10].id = 0x0076;
    suites[11].id = 0x0084;
    suites[12].id = 0x0161;
    suites[13].id = 0x1362;
    suites[14].id = 0x0131;
    suites[15].id = 0xCC6A;
    suites[16].id = 0x00C3;
    suites[17].id = 0xC086;
    suites[18].id = 0x0025;
    suites[19].id = 0xC072;
    suites[20].id = 0xC012;
    suites[21].id = 0xCC62;
    suites[22].id = 0xC029;
    suites[23].id = 0x1368;
    suites[24].id = 0x011F;
    suites[25].id = 0xC05E;
    suites[26].id = 0x012F;
    suites[27].id = 0x0113;
    suites[28].id = 0x015B;
    suites[29].id = 0xCCA3;
    suites[30].id = 0x0097;
    suites[31].id = 0xC0A5;
    suites[32].id = 0x001B;
    suites[33].id = 0x1389;
    suites[34].id = 0x1312;
    suites[35].id = 0x0120;
    suites[36].id = 0xCC28;
    suites[37].id = 0x130B;
    suites[38].id = 0x007B;
    suites[39].id = 0xC09F;
    suites[40].id = 0xC097;
    suites[41].id = 0xCC95;
    suites[42].id = 0x1346;
    suites[43].id = 0x13A8;
    suites[44].id = 0x1372;
    suites[45].id = 0x1371;
    suites[46].id = 0x0067;
    suites[47].id = 0xCC49;
    suites[48].id = 0x1348;
    suites[49].id = 0x0035;
    suites[50].id = 0x1305;
    suites[51].id = 0x0116;
    suites[52].id = 0x013F;
    suites[53].id = 0x0109;
    suites[54].id = 0x0096;
    suites[55].id = 0xCCA7;
    suites[56].id = 0x0057;
    suites[57].id = 0xCC07;
    suites[58].id = 0xC04B;
    suites[59].id = 0xC034;
    suites[60].id = 0x00C9;
    suites[61].id = 0x00C1;
    suites[62].id = 0x0042;
    suites[63].id = 0xC028;
    suites[64].id = 0xC05A;
    suites[65].id = 0xC0A0;
    suites[66].id = 0xCC3B;
    suites[67].id = 0xC090;
    suites[68].id = 0x0126;
    suites[69].id = 0x00CD;
    suites[70].id = 0x0134;
    suites[71].id = 0x1325;
    suites[72].id = 0x1384;
    suites[73].id = 0x002E;
    suites[74].id = 0x006D;
    for (index = 0; index < ALPHA_SUITE_COUNT; index++) {
#if ALPHA_VERSION == 1
        suites[index].strength = (uint8_t)((suites[index].id >> 4) & 0x0Fu);
        suites[index].flags = 0;
#else
        suites[index].strength = (uint8_t)(((suites[index].id >> 4) ^ suites[index].id) & 0x1Fu);
        suites[index].flags = (uint8_t)((suites[index].id & 0xFF00u) == 0xC000u ? 0x01u : 0x02u);
#endif
    }
}

size_t alpha_record_write(uint8_t *out, size_t capacity, uint8_t record_type, const uint8_t *body,
                          size_t body_length)
{
    if (body_length > 0xFFFFu || capacity < body_length + 5) {
        return 0;
    }
    out[0] = record_type;
    out[1] = 0x03;
    out[2] = 0x01;
    out[3] = (uint8_t)(body_length >> 8);
    out[4] = (uint8_t)body_length;
    memcpy(out + 5, body, body_length);
    return body_length + 5;
}

size_t alpha_handshake_build(const alpha_state *state, uint8_t *out, size_t capacity)
{
    alpha_suite suites[ALPHA_SUITE_COUNT];
    uint8_t body[512];
    size_t length = 0;
    size_t written;
    uint32_t random_state = (uint32_t)state->config.implant_id ^ 0x2545F491u;
    unsigned index;

    alpha_suite_table_fill(suites);
    body[length++] = 0x01;
    for (index = 0; index < 32; index++) {
        random_state = random_state * 1103515245u + 12345u;
        body[length++] = (uint8_t)(random_state >> 16);
    }
    body[length++] = 16;
    memcpy(body + length, state->session_key, 16);
    length += 16;
    body[length++] = (uint8_t)((ALPHA_SUITE_COUNT * 2) >> 8);
    body[length++] = (uint8_t)(ALPHA_SUITE_COUNT * 2);
    for (index = 0; index < ALPHA_SUITE_COUNT; index++) {
        if (suites[index].strength == 0 && suites[index].flags == 0) {
            continue;
        }
        body[length++] = (uint8_t)(suites[index].id >> 8);
        body[length++] = (uint8_t)suites[index].id;
    }
    body[length++] = 1;
    body[length++] = 0;
    written = alpha_record_write(out, capacity, 0x16, body, length);
#if ALPHA_VERSION >= 3
    if (written != 0) {
        /* v3: a second record carrying the configured host, like a server-name extension. */
        size_t host_length = strlen(state->config.host);
        size_t extension = alpha_record_write(out + written, capacity - written, 0x17,
                                              (const uint8_t *)state->config.host, host_length);
        written = extension == 0 ? 0 : written + extension;
    }
#endif
    return written;
}

size_t alpha_base32_decode(const char *text, uint8_t *out, size_t capacity)
{
    uint32_t bits = 0;
    unsigned pending = 0;
    size_t length = 0;

    for (; *text != '\0'; text++) {
        const char *position = strchr(alpha_base32_alphabet, *text);
        if (position == NULL) {
            return 0;
        }
        bits = (bits << 5) | (uint32_t)(position - alpha_base32_alphabet);
        pending += 5;
        if (pending >= 8) {
            pending -= 8;
            if (length >= capacity) {
                return 0;
            }
            out[length++] = (uint8_t)(bits >> pending);
        }
    }
    return length;
}

#if ALPHA_VERSION >= 2
size_t alpha_base64_decode(const char *text, uint8_t *out, size_t capacity)
{
    uint32_t bits = 0;
    unsigned pending = 0;
    size_t length = 0;

    for (; *text != '\0'; text++) {
        const char *position = strchr(alpha_base64_alphabet, *text);
        if (position == NULL) {
            return 0;
        }
        bits = (bits << 6) | (uint32_t)(position - alpha_base64_alphabet);
        pending += 6;
        if (pending >= 8) {
            pending -= 8;
            if (length >= capacity) {
                return 0;
            }
            out[length++] = (uint8_t)(bits >> pending);
        }
    }
    return length;
}
#endif

#if ALPHA_VERSION == 1
/* v1 only: the encoder the operators' builder shared with the implant; dropped in v2. */
void alpha_legacy_xor_encode(uint8_t *data, size_t length, uint8_t seed)
{
    uint8_t key = seed;
    size_t index;

    for (index = 0; index < length; index++) {
        data[index] ^= key;
        key = (uint8_t)(key * 0x0Du + 0x3Bu + (uint8_t)index);
    }
}
#endif

void alpha_config_apply_pair(alpha_config *config, const char *key, const char *value)
{
    if (strcmp(key, "id") == 0) {
        config->implant_id = strtoul(value, NULL, 10);
    } else if (strcmp(key, "sleep") == 0) {
        config->sleep_seconds = strtoul(value, NULL, 10);
    } else if (strcmp(key, "jitter") == 0) {
        config->jitter_percent = strtoul(value, NULL, 10);
    } else if (strcmp(key, "port") == 0) {
        config->port = strtoul(value, NULL, 10);
    } else if (strcmp(key, "mark") == 0) {
        strncpy(config->mark, value, sizeof config->mark - 1);
    } else if (strcmp(key, "host") == 0) {
        strncpy(config->host, value, sizeof config->host - 1);
    }
}

int alpha_config_decode(const char *blob, alpha_config *config)
{
    uint8_t raw[160];
    char text[160];
    size_t length;
    size_t index;
    uint8_t key;
    char *pair;
    char *cursor;

#if ALPHA_VERSION == 1
    length = alpha_base32_decode(blob, raw, sizeof raw);
    if (length == 0) {
        return -1;
    }
    alpha_legacy_xor_encode(raw, length, 0xA7);
    memcpy(text, raw, length);
#else
    length = alpha_base64_decode(blob, raw, sizeof raw);
    if (length < 3 || raw[0] != 'A' || raw[1] != 'K') {
        return -1;
    }
    key = raw[2];
    for (index = 3; index < length; index++) {
        text[index - 3] = (char)(raw[index] ^ key);
        key = (uint8_t)(key * 0x0Du + 0x3Bu + (uint8_t)(index - 3));
    }
    length -= 3;
#endif
    text[length] = '\0';
    memset(config, 0, sizeof *config);
    config->port = 443;
    for (pair = text; pair != NULL && *pair != '\0'; pair = cursor) {
        char *equals;
        cursor = strchr(pair, ';');
        if (cursor != NULL) {
            *cursor++ = '\0';
        }
        equals = strchr(pair, '=');
        if (equals == NULL) {
            return -1;
        }
        *equals = '\0';
        alpha_config_apply_pair(config, pair, equals + 1);
    }
#if ALPHA_VERSION == 1
    (void)index;
    (void)key;
#endif
    return config->implant_id == 0 ? -1 : 0;
}

enum alpha_command alpha_command_lookup(const char *name)
{
    uint32_t hash = alpha_hash_name(name);
    size_t index;

    for (index = 0; index < sizeof alpha_command_table / sizeof alpha_command_table[0]; index++) {
        if (alpha_command_table[index].name_hash == hash) {
            return alpha_command_table[index].command;
        }
    }
    return ALPHA_CMD_UNKNOWN;
}

uint32_t alpha_frame_checksum(const uint8_t *data, size_t length)
{
    uint32_t crc = (uint32_t)crc32(0L, data, (uInt)length);
    uint32_t folded = (crc >> 16) ^ (crc & 0xFFFFu);

    return (folded * 0x45D9F3Bu) ^ (uint32_t)length ^ 0x1F3D5B79u;
}

size_t alpha_pack_report(const alpha_state *state, const uint8_t *data, size_t length, uint8_t *out,
                         size_t capacity)
{
    uLongf packed = (uLongf)(capacity - 4);

    if (capacity < 4 || compress2(out + 4, &packed, data, (uLong)length, Z_BEST_COMPRESSION) != Z_OK) {
        return 0;
    }
    out[0] = (uint8_t)length;
    out[1] = (uint8_t)(length >> 8);
    out[2] = 'G';
    out[3] = 'A';
    alpha_cipher_crypt_ctr(&state->cipher, state->counter, out + 4, (size_t)packed);
    return (size_t)packed + 4;
}

size_t alpha_unpack_report(const alpha_state *state, uint8_t *packed, size_t packed_length,
                           uint8_t *out, size_t capacity)
{
    uLongf length = (uLongf)capacity;

    if (packed_length < 4 || packed[2] != 'G' || packed[3] != 'A') {
        return 0;
    }
    alpha_cipher_crypt_ctr(&state->cipher, state->counter, packed + 4, packed_length - 4);
    if (uncompress(out, &length, packed + 4, (uLong)(packed_length - 4)) != Z_OK) {
        return 0;
    }
    return (size_t)length;
}

#if ALPHA_VERSION >= 3
size_t alpha_jitter_schedule(const alpha_config *config, unsigned long *intervals, size_t count)
{
    uint32_t random_state = (uint32_t)config->implant_id * 0x2C1B3C6Du + 0x297A2D39u;
    size_t index;

    for (index = 0; index < count; index++) {
        unsigned long spread = config->sleep_seconds * config->jitter_percent / 100u;
        random_state ^= random_state << 7;
        random_state ^= random_state >> 9;
        intervals[index] = config->sleep_seconds - spread + (spread == 0 ? 0 : random_state % (2 * spread + 1));
    }
    return count;
}
#endif

size_t alpha_dispatch_command(alpha_state *state, enum alpha_command command, const char *argument,
                              uint8_t *reply, size_t capacity)
{
    size_t length = 0;
    char text[64];

    state->counter++;
    switch (command) {
    case ALPHA_CMD_BEACON:
        alpha_deobfuscate_string(alpha_encoded_beacon, sizeof alpha_encoded_beacon, text, sizeof text);
        length = (size_t)snprintf((char *)reply, capacity, "%s #%lu id=%lu", text,
                                  (unsigned long)state->counter, state->config.implant_id);
        break;
    case ALPHA_CMD_SLEEP:
        state->config.sleep_seconds = strtoul(argument, NULL, 10);
        length = (size_t)snprintf((char *)reply, capacity, "sleep=%lu", state->config.sleep_seconds);
        break;
    case ALPHA_CMD_ECHO:
        length = (size_t)snprintf((char *)reply, capacity, "%s", argument);
        break;
    case ALPHA_CMD_SYSINFO:
        length = alpha_deobfuscate_string(alpha_encoded_sysinfo, sizeof alpha_encoded_sysinfo,
                                          (char *)reply, capacity);
        break;
    case ALPHA_CMD_STORE: {
        size_t add = strlen(argument);
        if (state->store_len + add > sizeof state->store) {
            add = sizeof state->store - state->store_len;
        }
        memcpy(state->store + state->store_len, argument, add);
        state->store_len += add;
        length = (size_t)snprintf((char *)reply, capacity, "stored=%lu", (unsigned long)state->store_len);
        break;
    }
    case ALPHA_CMD_FETCH:
        length = state->store_len < capacity ? state->store_len : capacity;
        memcpy(reply, state->store, length);
        break;
    case ALPHA_CMD_PACK:
        length = alpha_pack_report(state, state->store, state->store_len, reply, capacity);
        break;
    case ALPHA_CMD_CHECKSUM:
        length = (size_t)snprintf((char *)reply, capacity, "sum=%08lx",
                                  (unsigned long)alpha_frame_checksum(state->store, state->store_len));
        break;
#if ALPHA_VERSION >= 2
    case ALPHA_CMD_REKEY:
        alpha_session_key_derive(state->config.implant_id, (uint32_t)strtoul(argument, NULL, 16),
                                 state->session_key);
        alpha_cipher_key_schedule(&state->cipher, state->session_key, sizeof state->session_key);
        length = (size_t)snprintf((char *)reply, capacity, "rekeyed");
        break;
    case ALPHA_CMD_SUITES:
        length = alpha_handshake_build(state, reply, capacity);
        break;
#endif
#if ALPHA_VERSION >= 3
    case ALPHA_CMD_JITTER: {
        unsigned long intervals[8];
        size_t index;
        alpha_jitter_schedule(&state->config, intervals, 8);
        for (index = 0; index < 8 && length + 12 < capacity; index++) {
            length += (size_t)snprintf((char *)reply + length, capacity - length, "%lu,", intervals[index]);
        }
        break;
    }
    case ALPHA_CMD_SELFCHECK: {
        uint8_t packed[ALPHA_REPLY_BYTES];
        size_t packed_length = alpha_pack_report(state, state->store, state->store_len, packed,
                                                 sizeof packed);
        size_t unpacked = alpha_unpack_report(state, packed, packed_length, reply, capacity);
        length = (size_t)snprintf((char *)reply, capacity, "selfcheck=%s",
                                  unpacked == state->store_len ? "ok" : "bad");
        break;
    }
#endif
    default:
        length = (size_t)snprintf((char *)reply, capacity, "unknown");
        break;
    }
    if (length > capacity) {
        length = capacity;
    }
    state->checksum = (uint32_t)crc32(state->checksum, reply, (uInt)length);
    return length;
}

static const char *const alpha_selftest_script[][2] = {
    {"beacon", ""},
    {"sleep", "120"},
    {"echo", "hello from the demo"},
    {"sysinfo", ""},
    {"store", "The quick brown fox jumps over the lazy dog. "},
    {"store", "The quick brown fox jumps over the lazy dog again. "},
    {"fetch", ""},
    {"pack", ""},
    {"checksum", ""},
    {"rekey", "5eed"},
    {"suites", ""},
    {"jitter", ""},
    {"selfcheck", ""},
    {"BEACON", ""},
};

int main(void)
{
    static alpha_state state;
    uint8_t reply[ALPHA_REPLY_BYTES];
    size_t step;
    size_t handshake;

    if (alpha_config_decode(alpha_config_blob, &state.config) != 0) {
        printf("alpha v%d: config decode failed\n", ALPHA_VERSION);
        return 1;
    }
    alpha_session_key_derive(state.config.implant_id, 0x0A1FA000u, state.session_key);
    alpha_cipher_key_schedule(&state.cipher, state.session_key, sizeof state.session_key);
    handshake = alpha_handshake_build(&state, reply, sizeof reply);
    state.checksum = (uint32_t)crc32(0L, reply, (uInt)handshake);
    for (step = 0; step < sizeof alpha_selftest_script / sizeof alpha_selftest_script[0]; step++) {
        enum alpha_command command = alpha_command_lookup(alpha_selftest_script[step][0]);
        alpha_dispatch_command(&state, command, alpha_selftest_script[step][1], reply, sizeof reply);
    }
    printf("alpha v%d selftest ok id=%lu host=%s handshake=%lu checksum=%08lx\n", ALPHA_VERSION,
           state.config.implant_id, state.config.host, (unsigned long)handshake,
           (unsigned long)state.checksum);
    return 0;
}
