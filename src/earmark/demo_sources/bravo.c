/* Demo family "bravo" (actor "Group B"); version chosen with -DBRAVO_VERSION=1 or 2.
 *
 * Benign: no network, files or processes. It frames, encrypts and dispatches a built-in list
 * of packets over in-memory buffers and prints a checksum. Its code shares nothing with
 * "alpha" except the statically linked zlib and the C runtime.
 *
 * How the code evolves:
 *   v1 -> v2: frames carry a version byte; the checksum starts from a new seed; the
 *             opcode table gains bravo_op_rotate_key; the cipher runs two more cycles.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

#include "zlib.h"

#ifndef BRAVO_VERSION
#define BRAVO_VERSION 1
#endif
#if BRAVO_VERSION < 1 || BRAVO_VERSION > 2
#error "BRAVO_VERSION must be 1 or 2"
#endif

#define BRAVO_SYNC_HIGH 0xB7u
#define BRAVO_SYNC_LOW 0x4Eu
#define BRAVO_ESCAPE 0xE5u
#define BRAVO_ESCAPE_MASK 0x2Au
#define BRAVO_FRAME_BYTES 1024
#define BRAVO_PAYLOAD_BYTES 384
#if BRAVO_VERSION == 1
#define BRAVO_CIPHER_CYCLES 24
#else
#define BRAVO_CIPHER_CYCLES 26
#endif

typedef struct {
    uint32_t key[4];
    uint32_t sequence;
    uint8_t vault[BRAVO_PAYLOAD_BYTES];
    size_t vault_len;
    uint32_t digest;
} bravo_session;

typedef struct {
    uint8_t opcode;
    uint8_t flags;
    uint16_t sequence;
    uint8_t payload[BRAVO_PAYLOAD_BYTES];
    size_t payload_len;
} bravo_packet;

typedef size_t (*bravo_handler)(bravo_session *, const bravo_packet *, uint8_t *, size_t);

/* Feistel cipher over 64-bit blocks with its own round constant and key rotation. */
void bravo_cipher_encrypt(const uint32_t key[4], uint32_t block[2])
{
    uint32_t left = block[0];
    uint32_t right = block[1];
    uint32_t sum = 0;
    unsigned cycle;

    for (cycle = 0; cycle < BRAVO_CIPHER_CYCLES; cycle++) {
        left += ((right << 3 ^ right >> 6) + right) ^ (sum + key[sum & 3u] + 0x13579BDFu);
        sum += 0x6B43A9E5u;
        right += ((left << 5 ^ left >> 4) + left) ^ (sum + key[(sum >> 9) & 3u]);
    }
    block[0] = left;
    block[1] = right;
}

void bravo_cipher_decrypt(const uint32_t key[4], uint32_t block[2])
{
    uint32_t left = block[0];
    uint32_t right = block[1];
    uint32_t sum = (uint32_t)(0x6B43A9E5u * (uint32_t)BRAVO_CIPHER_CYCLES);
    unsigned cycle;

    for (cycle = 0; cycle < BRAVO_CIPHER_CYCLES; cycle++) {
        right -= ((left << 5 ^ left >> 4) + left) ^ (sum + key[(sum >> 9) & 3u]);
        sum -= 0x6B43A9E5u;
        left -= ((right << 3 ^ right >> 6) + right) ^ (sum + key[sum & 3u] + 0x13579BDFu);
    }
    block[0] = left;
    block[1] = right;
}

void bravo_cipher_buffer(const uint32_t key[4], uint8_t *data, size_t length, int encrypt)
{
    size_t offset;

    for (offset = 0; offset + 8 <= length; offset += 8) {
        uint32_t block[2];
        block[0] = (uint32_t)data[offset] | (uint32_t)data[offset + 1] << 8
            | (uint32_t)data[offset + 2] << 16 | (uint32_t)data[offset + 3] << 24;
        block[1] = (uint32_t)data[offset + 4] | (uint32_t)data[offset + 5] << 8
            | (uint32_t)data[offset + 6] << 16 | (uint32_t)data[offset + 7] << 24;
        if (encrypt) {
            bravo_cipher_encrypt(key, block);
        } else {
            bravo_cipher_decrypt(key, block);
        }
        data[offset] = (uint8_t)block[0];
        data[offset + 1] = (uint8_t)(block[0] >> 8);
        data[offset + 2] = (uint8_t)(block[0] >> 16);
        data[offset + 3] = (uint8_t)(block[0] >> 24);
        data[offset + 4] = (uint8_t)block[1];
        data[offset + 5] = (uint8_t)(block[1] >> 8);
        data[offset + 6] = (uint8_t)(block[1] >> 16);
        data[offset + 7] = (uint8_t)(block[1] >> 24);
    }
    /* The tail shorter than a block is masked with the key, as the family always did. */
    for (; offset < length; offset++) {
        data[offset] ^= (uint8_t)(key[offset & 3u] >> ((offset & 3u) * 8));
    }
}

/* Fletcher-style 16-bit sum with a family-specific seed and modulus. */
uint16_t bravo_checksum16(const uint8_t *data, size_t length)
{
#if BRAVO_VERSION == 1
    uint32_t low = 0x5Bu;
    uint32_t high = 0xC4u;
#else
    uint32_t low = 0x3Du;
    uint32_t high = 0x9Eu;
#endif
    size_t index;

    for (index = 0; index < length; index++) {
        low = (low + data[index] + (uint32_t)(index & 7u)) % 251u;
        high = (high + low) % 241u;
    }
    return (uint16_t)(high << 8 | low);
}

static size_t bravo_put_escaped(uint8_t *out, size_t length, size_t capacity, uint8_t value)
{
    if (value == BRAVO_SYNC_HIGH || value == BRAVO_ESCAPE) {
        if (length + 2 > capacity) {
            return 0;
        }
        out[length] = BRAVO_ESCAPE;
        out[length + 1] = (uint8_t)(value ^ BRAVO_ESCAPE_MASK);
        return length + 2;
    }
    if (length + 1 > capacity) {
        return 0;
    }
    out[length] = value;
    return length + 1;
}

size_t bravo_frame_packet(const bravo_packet *packet, uint8_t *out, size_t capacity)
{
    uint8_t header[8];
    size_t header_len = 0;
    size_t length = 2;
    size_t index;
    uint16_t sum;

    if (capacity < 2) {
        return 0;
    }
    out[0] = BRAVO_SYNC_HIGH;
    out[1] = BRAVO_SYNC_LOW;
#if BRAVO_VERSION >= 2
    header[header_len++] = 0x02;
#endif
    header[header_len++] = packet->opcode;
    header[header_len++] = packet->flags;
    header[header_len++] = (uint8_t)(packet->sequence >> 8);
    header[header_len++] = (uint8_t)packet->sequence;
    header[header_len++] = (uint8_t)(packet->payload_len >> 8);
    header[header_len++] = (uint8_t)packet->payload_len;
    for (index = 0; index < header_len && length != 0; index++) {
        length = bravo_put_escaped(out, length, capacity, header[index]);
    }
    for (index = 0; index < packet->payload_len && length != 0; index++) {
        length = bravo_put_escaped(out, length, capacity, packet->payload[index]);
    }
    sum = (uint16_t)(bravo_checksum16(header, header_len)
                     ^ bravo_checksum16(packet->payload, packet->payload_len));
    if (length != 0) {
        length = bravo_put_escaped(out, length, capacity, (uint8_t)(sum >> 8));
    }
    if (length != 0) {
        length = bravo_put_escaped(out, length, capacity, (uint8_t)sum);
    }
    return length;
}

int bravo_unframe_packet(const uint8_t *frame, size_t frame_len, bravo_packet *packet)
{
    uint8_t raw[BRAVO_FRAME_BYTES];
    size_t raw_len = 0;
    size_t index;
    size_t header_len = BRAVO_VERSION >= 2 ? 7 : 6;
    uint16_t expected;

    if (frame_len < 2 || frame[0] != BRAVO_SYNC_HIGH || frame[1] != BRAVO_SYNC_LOW) {
        return -1;
    }
    for (index = 2; index < frame_len && raw_len < sizeof raw; index++) {
        if (frame[index] == BRAVO_ESCAPE && index + 1 < frame_len) {
            raw[raw_len++] = (uint8_t)(frame[++index] ^ BRAVO_ESCAPE_MASK);
        } else {
            raw[raw_len++] = frame[index];
        }
    }
    if (raw_len < header_len + 2) {
        return -1;
    }
    index = BRAVO_VERSION >= 2 ? 1 : 0;
    packet->opcode = raw[index];
    packet->flags = raw[index + 1];
    packet->sequence = (uint16_t)(raw[index + 2] << 8 | raw[index + 3]);
    packet->payload_len = (size_t)raw[index + 4] << 8 | raw[index + 5];
    if (packet->payload_len > sizeof packet->payload || header_len + packet->payload_len + 2 != raw_len) {
        return -1;
    }
    memcpy(packet->payload, raw + header_len, packet->payload_len);
    expected = (uint16_t)(bravo_checksum16(raw, header_len)
                          ^ bravo_checksum16(packet->payload, packet->payload_len));
    return expected == (uint16_t)(raw[raw_len - 2] << 8 | raw[raw_len - 1]) ? 0 : -1;
}

size_t bravo_op_ping(bravo_session *session, const bravo_packet *packet, uint8_t *reply, size_t capacity)
{
    (void)packet;
    return (size_t)snprintf((char *)reply, capacity, "PONG/%lu", (unsigned long)session->sequence);
}

size_t bravo_op_info(bravo_session *session, const bravo_packet *packet, uint8_t *reply, size_t capacity)
{
    (void)packet;
    return (size_t)snprintf((char *)reply, capacity, "bravo/%d vault=%lu digest=%08lx", BRAVO_VERSION,
                            (unsigned long)session->vault_len, (unsigned long)session->digest);
}

size_t bravo_op_keep(bravo_session *session, const bravo_packet *packet, uint8_t *reply, size_t capacity)
{
    size_t room = sizeof session->vault - session->vault_len;
    size_t take = packet->payload_len < room ? packet->payload_len : room;

    memcpy(session->vault + session->vault_len, packet->payload, take);
    session->vault_len += take;
    return (size_t)snprintf((char *)reply, capacity, "KEPT %lu", (unsigned long)take);
}

size_t bravo_op_recall(bravo_session *session, const bravo_packet *packet, uint8_t *reply, size_t capacity)
{
    size_t length = session->vault_len < capacity ? session->vault_len : capacity;

    (void)packet;
    memcpy(reply, session->vault, length);
    bravo_cipher_buffer(session->key, reply, length, 1);
    return length;
}

size_t bravo_op_squeeze(bravo_session *session, const bravo_packet *packet, uint8_t *reply, size_t capacity)
{
    uLongf packed = (uLongf)capacity;
    uint8_t check[BRAVO_PAYLOAD_BYTES];
    uLongf check_len = (uLongf)sizeof check;

    (void)packet;
    if (compress(reply, &packed, session->vault, (uLong)session->vault_len) != Z_OK) {
        return 0;
    }
    if (uncompress(check, &check_len, reply, packed) != Z_OK || check_len != session->vault_len) {
        return 0;
    }
    return (size_t)packed;
}

#if BRAVO_VERSION >= 2
size_t bravo_op_rotate_key(bravo_session *session, const bravo_packet *packet, uint8_t *reply,
                           size_t capacity)
{
    unsigned lane;

    for (lane = 0; lane < 4; lane++) {
        uint32_t mixed = session->key[lane] ^ (uint32_t)packet->sequence * 0x01010101u;
        session->key[lane] = (mixed << 9 | mixed >> 23) + 0x7F4A7C15u * (lane + 1);
    }
    return (size_t)snprintf((char *)reply, capacity, "KEY %08lx", (unsigned long)session->key[0]);
}
#endif

static const bravo_handler bravo_opcode_table[] = {
    bravo_op_ping, bravo_op_info, bravo_op_keep, bravo_op_recall, bravo_op_squeeze,
#if BRAVO_VERSION >= 2
    bravo_op_rotate_key,
#endif
};

size_t bravo_dispatch(bravo_session *session, const bravo_packet *packet, uint8_t *reply, size_t capacity)
{
    size_t length;
    size_t opcode = (size_t)(packet->opcode ^ 0x40u);

    if (opcode >= sizeof bravo_opcode_table / sizeof bravo_opcode_table[0]) {
        return (size_t)snprintf((char *)reply, capacity, "ERR opcode");
    }
    session->sequence = packet->sequence;
    length = bravo_opcode_table[opcode](session, packet, reply, capacity);
    if (length > capacity) {
        length = capacity;
    }
    session->digest = (uint32_t)crc32(session->digest, reply, (uInt)length) ^ bravo_checksum16(reply, length);
    return length;
}

void bravo_session_open(bravo_session *session, const char *passphrase)
{
    uint32_t accumulator = 0x2B7E1516u;
    size_t index;

    memset(session, 0, sizeof *session);
    for (index = 0; passphrase[index] != '\0'; index++) {
        accumulator = (accumulator ^ (uint8_t)passphrase[index]) * 0x01000193u;
        session->key[index & 3u] ^= accumulator + (uint32_t)(index * 0x9D2C5680u);
    }
    session->digest = (uint32_t)adler32(0L, (const Bytef *)passphrase, (uInt)strlen(passphrase));
}

static const struct {
    uint8_t opcode;
    const char *payload;
} bravo_selftest_packets[] = {
    {0x40, ""},
    {0x42, "Lorem ipsum dolor sit amet, consectetur adipiscing elit. "},
    {0x42, "Sed do eiusmod tempor incididunt ut labore et dolore magna aliqua. "},
    {0x41, ""},
    {0x43, ""},
    {0x44, ""},
    {0x45, ""},
    {0x41, ""},
    {0x47, ""},
};

int main(void)
{
    static bravo_session session;
    static bravo_packet packet;
    static bravo_packet received;
    uint8_t frame[BRAVO_FRAME_BYTES];
    uint8_t reply[BRAVO_FRAME_BYTES];
    size_t index;
    unsigned long frames = 0;

    bravo_session_open(&session, "group-b demo passphrase");
    for (index = 0; index < sizeof bravo_selftest_packets / sizeof bravo_selftest_packets[0]; index++) {
        size_t frame_len;
        memset(&packet, 0, sizeof packet);
        packet.opcode = bravo_selftest_packets[index].opcode;
        packet.flags = (uint8_t)(index & 1u);
        packet.sequence = (uint16_t)(0x0100u + index);
        packet.payload_len = strlen(bravo_selftest_packets[index].payload);
        memcpy(packet.payload, bravo_selftest_packets[index].payload, packet.payload_len);
        bravo_cipher_buffer(session.key, packet.payload, packet.payload_len, 1);
        frame_len = bravo_frame_packet(&packet, frame, sizeof frame);
        if (frame_len == 0 || bravo_unframe_packet(frame, frame_len, &received) != 0) {
            printf("bravo v%d: framing failed at packet %lu\n", BRAVO_VERSION, (unsigned long)index);
            return 1;
        }
        bravo_cipher_buffer(session.key, received.payload, received.payload_len, 0);
        bravo_dispatch(&session, &received, reply, sizeof reply);
        frames++;
    }
    printf("bravo v%d selftest ok frames=%lu checksum=%08lx\n", BRAVO_VERSION, frames,
           (unsigned long)session.digest);
    return 0;
}
