/* Demo program "delta": the negative control.
 *
 * Unrelated to every family (a cellular automaton, run-length coding, sorting and statistics)
 * but statically linked with the same zlib copy as alpha and bravo. A correct attribution
 * finds only library and C runtime code here and answers "no known actor".
 * Benign: no network, files or processes; a deterministic self-test prints a checksum.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

#include "zlib.h"

#define DELTA_WIDTH 24
#define DELTA_HEIGHT 16
#define DELTA_SAMPLES 40

typedef struct {
    uint8_t cells[DELTA_HEIGHT][DELTA_WIDTH];
} delta_grid;

void delta_grid_seed(delta_grid *grid, uint32_t seed)
{
    int row;
    int column;

    for (row = 0; row < DELTA_HEIGHT; row++) {
        for (column = 0; column < DELTA_WIDTH; column++) {
            seed = seed * 214013u + 2531011u;
            grid->cells[row][column] = (uint8_t)((seed >> 16) % 3u == 0u);
        }
    }
}

int delta_count_neighbours(const delta_grid *grid, int row, int column)
{
    int count = 0;
    int row_step;
    int column_step;

    for (row_step = -1; row_step <= 1; row_step++) {
        for (column_step = -1; column_step <= 1; column_step++) {
            int neighbour_row = (row + row_step + DELTA_HEIGHT) % DELTA_HEIGHT;
            int neighbour_column = (column + column_step + DELTA_WIDTH) % DELTA_WIDTH;
            if (row_step != 0 || column_step != 0) {
                count += grid->cells[neighbour_row][neighbour_column];
            }
        }
    }
    return count;
}

void delta_grid_step(const delta_grid *current, delta_grid *next)
{
    int row;
    int column;

    for (row = 0; row < DELTA_HEIGHT; row++) {
        for (column = 0; column < DELTA_WIDTH; column++) {
            int neighbours = delta_count_neighbours(current, row, column);
            next->cells[row][column] =
                (uint8_t)(neighbours == 3 || (neighbours == 2 && current->cells[row][column]));
        }
    }
}

int delta_grid_population(const delta_grid *grid)
{
    int row;
    int column;
    int population = 0;

    for (row = 0; row < DELTA_HEIGHT; row++) {
        for (column = 0; column < DELTA_WIDTH; column++) {
            population += grid->cells[row][column];
        }
    }
    return population;
}

size_t delta_run_length_encode(const uint8_t *data, size_t length, uint8_t *out, size_t capacity)
{
    size_t read = 0;
    size_t written = 0;

    while (read < length) {
        uint8_t value = data[read];
        size_t run = 1;
        while (read + run < length && data[read + run] == value && run < 255) {
            run++;
        }
        if (written + 2 > capacity) {
            return 0;
        }
        out[written++] = (uint8_t)run;
        out[written++] = value;
        read += run;
    }
    return written;
}

size_t delta_run_length_decode(const uint8_t *data, size_t length, uint8_t *out, size_t capacity)
{
    size_t read;
    size_t written = 0;

    for (read = 0; read + 1 < length; read += 2) {
        if (written + data[read] > capacity) {
            return 0;
        }
        memset(out + written, data[read + 1], data[read]);
        written += data[read];
    }
    return written;
}

void delta_insertion_sort(int32_t *values, size_t count)
{
    size_t index;

    for (index = 1; index < count; index++) {
        int32_t value = values[index];
        size_t position = index;
        while (position > 0 && values[position - 1] > value) {
            values[position] = values[position - 1];
            position--;
        }
        values[position] = value;
    }
}

int32_t delta_median(int32_t *values, size_t count)
{
    delta_insertion_sort(values, count);
    if (count % 2 == 0) {
        return (values[count / 2 - 1] + values[count / 2]) / 2;
    }
    return values[count / 2];
}

int32_t delta_mean_absolute_deviation(const int32_t *values, size_t count, int32_t centre)
{
    int32_t total = 0;
    size_t index;

    for (index = 0; index < count; index++) {
        total += values[index] > centre ? values[index] - centre : centre - values[index];
    }
    return count == 0 ? 0 : total / (int32_t)count;
}

int delta_luhn_valid(const char *digits)
{
    size_t length = strlen(digits);
    int total = 0;
    size_t index;

    for (index = 0; index < length; index++) {
        int digit = digits[length - 1 - index] - '0';
        if (digit < 0 || digit > 9) {
            return 0;
        }
        if (index % 2 == 1) {
            digit *= 2;
            if (digit > 9) {
                digit -= 9;
            }
        }
        total += digit;
    }
    return total % 10 == 0;
}

int main(void)
{
    static delta_grid grids[2];
    uint8_t encoded[2 * DELTA_WIDTH * DELTA_HEIGHT];
    uint8_t decoded[DELTA_WIDTH * DELTA_HEIGHT];
    uint8_t packed[1024];
    uint8_t unpacked[DELTA_WIDTH * DELTA_HEIGHT];
    int32_t populations[DELTA_SAMPLES];
    uLongf packed_length = sizeof packed;
    uLongf unpacked_length = sizeof unpacked;
    size_t encoded_length;
    uint32_t checksum;
    int generation;
    int32_t median;

    delta_grid_seed(&grids[0], 0xD317Au);
    for (generation = 0; generation < DELTA_SAMPLES; generation++) {
        delta_grid_step(&grids[generation & 1], &grids[(generation + 1) & 1]);
        populations[generation] = delta_grid_population(&grids[(generation + 1) & 1]);
    }
    encoded_length = delta_run_length_encode(&grids[0].cells[0][0], sizeof decoded, encoded, sizeof encoded);
    if (delta_run_length_decode(encoded, encoded_length, decoded, sizeof decoded) != sizeof decoded
        || memcmp(decoded, grids[0].cells, sizeof decoded) != 0) {
        printf("delta selftest failed: run-length round trip\n");
        return 1;
    }
    if (compress(packed, &packed_length, encoded, (uLong)encoded_length) != Z_OK
        || uncompress(unpacked, &unpacked_length, packed, packed_length) != Z_OK
        || unpacked_length != encoded_length || memcmp(unpacked, encoded, encoded_length) != 0) {
        printf("delta selftest failed: zlib round trip\n");
        return 1;
    }
    if (!delta_luhn_valid("79927398713") || delta_luhn_valid("79927398710")) {
        printf("delta selftest failed: luhn\n");
        return 1;
    }
    median = delta_median(populations, DELTA_SAMPLES);
    checksum = (uint32_t)crc32(0L, packed, (uInt)packed_length);
    checksum = (uint32_t)crc32(checksum, (const Bytef *)populations, sizeof populations);
    printf("delta selftest ok median=%ld spread=%ld rle=%lu checksum=%08lx\n", (long)median,
           (long)delta_mean_absolute_deviation(populations, DELTA_SAMPLES, median),
           (unsigned long)encoded_length, (unsigned long)checksum);
    return 0;
}
