/* Rare routines of the "alpha" demo family; see alpha_core.h for why they live apart. */
#include <string.h>

#include "alpha_core.h"

/* Substitution table of the hand-rolled block cipher: a fixed permutation of 0..255. */
static const uint8_t alpha_sbox[256] = {
    0x4F, 0x34, 0x90, 0xBB, 0xAA, 0x23, 0x8B, 0x10, 0x27, 0x73, 0x60, 0xE3, 0x26, 0xAE, 0x39, 0x72,
    0x1F, 0x83, 0xBC, 0xA4, 0xDD, 0xE8, 0x12, 0x9B, 0x18, 0xDA, 0x55, 0x04, 0x02, 0x0A, 0xE5, 0x37,
    0x0B, 0xDB, 0x97, 0x49, 0xC3, 0x7B, 0x85, 0x3F, 0x63, 0x6D, 0x8F, 0xC7, 0x64, 0x4A, 0x56, 0x99,
    0xD0, 0x1E, 0x86, 0xD4, 0xC2, 0xC0, 0x41, 0xC8, 0x6F, 0x08, 0x4D, 0x2F, 0xFE, 0x9D, 0x22, 0x5A,
    0x71, 0x4C, 0xCB, 0x66, 0x45, 0x89, 0x21, 0xEB, 0x05, 0xE1, 0xE2, 0x59, 0xB2, 0x2E, 0x1A, 0x9C,
    0xF4, 0xE4, 0xF1, 0xCF, 0x6B, 0x19, 0x6E, 0xA3, 0xCE, 0x07, 0xD3, 0x13, 0x8A, 0xD7, 0x16, 0xDC,
    0x9F, 0x61, 0x7C, 0x58, 0xA9, 0x5E, 0x30, 0xDF, 0xA5, 0x2B, 0x47, 0xD1, 0xC4, 0xFF, 0x6C, 0xD5,
    0x5C, 0x48, 0x0E, 0x4E, 0xF7, 0xFA, 0x77, 0x67, 0xAC, 0x6A, 0x44, 0x11, 0xB6, 0x38, 0x33, 0x7D,
    0xCC, 0xE9, 0xC9, 0xC6, 0x14, 0xC1, 0xED, 0xF3, 0xD9, 0xFB, 0xB5, 0x2D, 0x28, 0x2A, 0xA7, 0xE6,
    0x96, 0x52, 0x62, 0xFC, 0x0F, 0x74, 0xCD, 0xB1, 0x29, 0x5D, 0xFD, 0xF5, 0xB8, 0xF8, 0x20, 0xB4,
    0xAD, 0x93, 0xD2, 0x7E, 0x8C, 0xBF, 0x88, 0x9E, 0x40, 0xB9, 0x01, 0x3D, 0x25, 0x50, 0x8D, 0x1C,
    0x79, 0x57, 0xEF, 0x5B, 0x9A, 0x95, 0x53, 0x15, 0x24, 0x3E, 0x51, 0xEE, 0x46, 0xA8, 0x31, 0xB3,
    0x7F, 0x06, 0x35, 0x91, 0x03, 0x69, 0xE7, 0xD6, 0x78, 0xA6, 0x00, 0x17, 0x3A, 0x68, 0x09, 0x2C,
    0x0D, 0xBE, 0x54, 0x42, 0xDE, 0x7A, 0xAF, 0x65, 0x87, 0xBA, 0x3B, 0xEC, 0xE0, 0xB7, 0xF0, 0x92,
    0x32, 0xA2, 0x84, 0xC5, 0x1D, 0x43, 0x8E, 0x94, 0xF9, 0x1B, 0xAB, 0x75, 0xF2, 0x4B, 0x3C, 0x98,
    0x70, 0x36, 0x0C, 0xEA, 0xA1, 0xB0, 0x5F, 0x82, 0xD8, 0xF6, 0xA0, 0xBD, 0x80, 0x81, 0xCA, 0x76,
};

/* One constant per round key, mixed in by the key schedule. */
static const uint32_t alpha_round_constants[ALPHA_ROUNDS + 1] = {
    0xB3D0CF26, 0xF92C0B02, 0x5785C3E8, 0x4B0DF275,
    0xF428CE8F, 0x45D93AD9, 0x8B125F04, 0x24AE3B7C,
    0xE50DF037, 0x4844E6D4, 0xBF1B95EE,
};

/* Key of the string obfuscation, indexed by (7 * position + 3) mod 16. */
static const uint8_t alpha_string_key[16] = {
    0xF2, 0xDE, 0x2F, 0xF3, 0x94, 0x48, 0x90, 0xDB, 0xEA, 0x2C, 0xF0, 0x8B, 0xCB, 0xF1, 0x89, 0xB2,
};

/* Macros rather than helper functions, so this unit defines exactly the four public routines
 * at every optimisation level (the truth list of earmark.demo_build depends on it). */
#define ALPHA_ROTL(value, bits) (((value) << (bits)) | ((value) >> (32u - (bits))))
#define ALPHA_SUBSTITUTE_WORD(word)                                                  \
    ((uint32_t)alpha_sbox[(word) & 0xFFu] | ((uint32_t)alpha_sbox[((word) >> 8) & 0xFFu] << 8) \
     | ((uint32_t)alpha_sbox[((word) >> 16) & 0xFFu] << 16)                         \
     | ((uint32_t)alpha_sbox[((word) >> 24) & 0xFFu] << 24))

void alpha_cipher_key_schedule(alpha_cipher_ctx *ctx, const uint8_t *key, size_t key_len)
{
    uint32_t state[4] = {0x61C0FFEEu, 0x1B873593u ^ 0x5A5A5A5Au, 0x0DDBA11Au, 0xFEEDF00Du};
    size_t index;
    unsigned round;

    for (index = 0; index < key_len; index++) {
        uint32_t lane = state[index & 3u];
        lane = ALPHA_ROTL(lane, 8) ^ alpha_sbox[(uint8_t)(key[index] ^ (uint8_t)index)];
        state[index & 3u] = lane * 0x01000193u + (uint32_t)key_len;
    }
    for (round = 0; round <= ALPHA_ROUNDS; round++) {
        uint32_t mixed = ALPHA_ROTL(ALPHA_SUBSTITUTE_WORD(state[3]), 7) ^ alpha_round_constants[round];
        state[0] ^= mixed;
        state[1] ^= state[0];
        state[2] ^= ALPHA_ROTL(state[1], 3);
        state[3] ^= state[2] + 0x3C6EF372u;
        memcpy(ctx->round_keys[round], state, sizeof state);
    }
}

void alpha_cipher_encrypt_block(const alpha_cipher_ctx *ctx, uint8_t block[ALPHA_BLOCK_BYTES])
{
    uint32_t words[4];
    unsigned lane;
    unsigned round;

    for (lane = 0; lane < 4; lane++) {
        words[lane] = ((uint32_t)block[4 * lane] | ((uint32_t)block[4 * lane + 1] << 8)
                       | ((uint32_t)block[4 * lane + 2] << 16) | ((uint32_t)block[4 * lane + 3] << 24))
            ^ ctx->round_keys[0][lane];
    }
    for (round = 1; round <= ALPHA_ROUNDS; round++) {
        for (lane = 0; lane < 4; lane++) {
            words[lane] = ALPHA_SUBSTITUTE_WORD(words[lane]);
        }
        words[0] ^= ALPHA_ROTL(words[1], 5);
        words[1] += ALPHA_ROTL(words[2], 11) ^ words[3];
        words[2] ^= ALPHA_ROTL(words[3], 17);
        words[3] += words[0] ^ 0xC6EF3720u;
        for (lane = 0; lane < 4; lane++) {
            words[lane] ^= ctx->round_keys[round][lane];
        }
    }
    for (lane = 0; lane < 4; lane++) {
        block[4 * lane] = (uint8_t)words[lane];
        block[4 * lane + 1] = (uint8_t)(words[lane] >> 8);
        block[4 * lane + 2] = (uint8_t)(words[lane] >> 16);
        block[4 * lane + 3] = (uint8_t)(words[lane] >> 24);
    }
}

uint32_t alpha_hash_name(const char *name)
{
    uint32_t hash = 0x5A17C0DEu;

    while (*name != '\0') {
        uint8_t symbol = (uint8_t)*name++;
        if (symbol >= 'A' && symbol <= 'Z') {
            symbol = (uint8_t)(symbol + 32);
        }
        hash ^= symbol;
        hash = ALPHA_ROTL(hash, 11);
        hash = hash * 0x2F1B3C4Du + 0x6E3D9A57u;
    }
    hash ^= hash >> 15;
    hash *= 0xC3A5C85Bu;
    hash ^= hash >> 13;
    return hash;
}

size_t alpha_deobfuscate_string(const uint8_t *encoded, size_t length, char *out, size_t out_cap)
{
    uint8_t rolling = 0x5D;
    size_t count;
    size_t index;

    if (out_cap == 0) {
        return 0;
    }
    count = length < out_cap - 1 ? length : out_cap - 1;
    for (index = 0; index < count; index++) {
        uint8_t symbol = (uint8_t)(encoded[index] ^ alpha_string_key[(index * 7u + 3u) & 15u] ^ rolling);
        out[index] = (char)(uint8_t)((symbol >> 3) | (symbol << 5));
        rolling = (uint8_t)(rolling * 0x1Du + encoded[index]);
    }
    out[count] = '\0';
    return count;
}
