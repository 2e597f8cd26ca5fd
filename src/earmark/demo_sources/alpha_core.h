/* Rare routines of the "alpha" demo family (actor "Group A").
 *
 * This translation unit is compiled unchanged into every alpha version AND into "charlie",
 * which reuses exactly these four routines: that is the shared rare code an attribution
 * engine should find. The routines do not depend on ALPHA_VERSION on purpose, so charlie
 * shares identical machine code with each alpha version built by the same toolchain.
 * Benign demo code: it only transforms buffers in memory.
 */
#ifndef ALPHA_CORE_H
#define ALPHA_CORE_H

#include <stddef.h>
#include <stdint.h>

#define ALPHA_BLOCK_BYTES 16
#define ALPHA_ROUNDS 10

typedef struct {
    uint32_t round_keys[ALPHA_ROUNDS + 1][4];
} alpha_cipher_ctx;

void alpha_cipher_key_schedule(alpha_cipher_ctx *ctx, const uint8_t *key, size_t key_len);
void alpha_cipher_encrypt_block(const alpha_cipher_ctx *ctx, uint8_t block[ALPHA_BLOCK_BYTES]);
uint32_t alpha_hash_name(const char *name);
size_t alpha_deobfuscate_string(const uint8_t *encoded, size_t length, char *out, size_t out_cap);

#endif
