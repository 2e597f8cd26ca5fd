/* "zpack": a tiny gzip-like tool over the vendored zlib: the goodware of the demo corpus.
 *
 * It contains zlib and the C runtime and nothing rare, so ingesting it with --goodware
 * teaches the knowledge base that this code is common library code, not a family trait.
 *
 *   zpack              run the built-in self-test and print a checksum
 *   zpack -c IN OUT    compress file IN into gzip file OUT
 *   zpack -d IN OUT    decompress gzip file IN into OUT
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "zlib.h"

#define ZPACK_CHUNK 16384
/* windowBits 15 plus 16 asks zlib for a gzip wrapper instead of a zlib one. */
#define ZPACK_GZIP_WINDOW (15 + 16)

int zpack_compress_stream(FILE *source, FILE *target, int level)
{
    static unsigned char input[ZPACK_CHUNK];
    static unsigned char output[ZPACK_CHUNK];
    z_stream stream;
    int flush;
    int status;

    memset(&stream, 0, sizeof stream);
    if (deflateInit2(&stream, level, Z_DEFLATED, ZPACK_GZIP_WINDOW, 8, Z_DEFAULT_STRATEGY) != Z_OK) {
        return -1;
    }
    do {
        stream.avail_in = (uInt)fread(input, 1, sizeof input, source);
        if (ferror(source)) {
            deflateEnd(&stream);
            return -1;
        }
        flush = feof(source) ? Z_FINISH : Z_NO_FLUSH;
        stream.next_in = input;
        do {
            stream.avail_out = sizeof output;
            stream.next_out = output;
            status = deflate(&stream, flush);
            if (status == Z_STREAM_ERROR) {
                deflateEnd(&stream);
                return -1;
            }
            if (fwrite(output, 1, sizeof output - stream.avail_out, target) != sizeof output - stream.avail_out) {
                deflateEnd(&stream);
                return -1;
            }
        } while (stream.avail_out == 0);
    } while (flush != Z_FINISH);
    deflateEnd(&stream);
    return 0;
}

int zpack_decompress_stream(FILE *source, FILE *target)
{
    static unsigned char input[ZPACK_CHUNK];
    static unsigned char output[ZPACK_CHUNK];
    z_stream stream;
    int status = Z_OK;

    memset(&stream, 0, sizeof stream);
    if (inflateInit2(&stream, ZPACK_GZIP_WINDOW) != Z_OK) {
        return -1;
    }
    do {
        stream.avail_in = (uInt)fread(input, 1, sizeof input, source);
        if (ferror(source) || stream.avail_in == 0) {
            break;
        }
        stream.next_in = input;
        do {
            stream.avail_out = sizeof output;
            stream.next_out = output;
            status = inflate(&stream, Z_NO_FLUSH);
            if (status == Z_NEED_DICT || status == Z_DATA_ERROR || status == Z_MEM_ERROR
                || status == Z_STREAM_ERROR) {
                inflateEnd(&stream);
                return -1;
            }
            fwrite(output, 1, sizeof output - stream.avail_out, target);
        } while (stream.avail_out == 0);
    } while (status != Z_STREAM_END);
    inflateEnd(&stream);
    return status == Z_STREAM_END ? 0 : -1;
}

int zpack_selftest(void)
{
    static const char text[] =
        "zpack self-test: it was the best of times, it was the worst of times, it was the age of "
        "wisdom, it was the age of foolishness, it was the epoch of belief, it was the epoch of "
        "incredulity, it was the season of Light, it was the season of Darkness.";
    unsigned char packed[512];
    unsigned char unpacked[512];
    uLongf packed_length = sizeof packed;
    uLongf unpacked_length = sizeof unpacked;
    char report[160];

    if (compress2(packed, &packed_length, (const Bytef *)text, sizeof text, Z_BEST_COMPRESSION) != Z_OK
        || uncompress(unpacked, &unpacked_length, packed, packed_length) != Z_OK
        || unpacked_length != sizeof text || memcmp(unpacked, text, sizeof text) != 0) {
        printf("zpack selftest failed\n");
        return 1;
    }
    snprintf(report, sizeof report, "zpack selftest ok zlib=%s packed=%lu crc=%08lx adler=%08lx",
             zlibVersion(), (unsigned long)packed_length,
             (unsigned long)crc32(0L, (const Bytef *)text, sizeof text),
             (unsigned long)adler32(1L, (const Bytef *)text, sizeof text));
    printf("%s\n", report);
    return 0;
}

int main(int argc, char **argv)
{
    FILE *source;
    FILE *target;
    int status;

    if (argc == 1) {
        return zpack_selftest();
    }
    if (argc != 4 || (strcmp(argv[1], "-c") != 0 && strcmp(argv[1], "-d") != 0)) {
        fprintf(stderr, "usage: zpack [-c|-d IN OUT]\n");
        return 2;
    }
    source = fopen(argv[2], "rb");
    if (source == NULL) {
        fprintf(stderr, "zpack: cannot read %s\n", argv[2]);
        return 1;
    }
    target = fopen(argv[3], "wb");
    if (target == NULL) {
        fclose(source);
        fprintf(stderr, "zpack: cannot write %s\n", argv[3]);
        return 1;
    }
    status = argv[1][1] == 'c' ? zpack_compress_stream(source, target, Z_BEST_COMPRESSION)
                               : zpack_decompress_stream(source, target);
    fclose(source);
    if (fclose(target) != 0) {
        status = -1;
    }
    return status == 0 ? 0 : 1;
}
