/* test_mask_vectors: checks randmask_mask.h against the committed vectors of mask scheme 1 and checks the
 * bijection exhaustively on small shapes.
 *
 *     test_mask_vectors tests/vectors/mask_scheme1.txt
 *
 * Vector lines are `out in key slot row col` (key: unsigned 64-bit decimal; '#' starts a comment line). For each
 * line: sigma(slot) == (row, col), sigma^-1(row, col) == slot, and randmask_slot() honours the n threshold.
 * Exhaustive part: for a few small shapes and keys, slot_to_flat hits every position of [0, N) exactly once and
 * flat_to_slot inverts it. Prints a summary; exits nonzero on any mismatch (the first few are printed).
 * Also builds as C++ (see CMakeLists.txt), so the header is checked in both languages.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "randmask_mask.h"

#define MAX_REPORTED 10

static long failures = 0;

static void fail(const char* what, uint32_t out, uint32_t in, uint64_t key, uint32_t x, int64_t got,
                 int64_t want) {
    if (failures++ < MAX_REPORTED) {
        printf("MISMATCH %s: shape %" PRIu32 "x%" PRIu32 " key %" PRIu64 " input %" PRIu32 ": got %" PRId64
               ", want %" PRId64 "\n",
               what, out, in, key, x, got, want);
    }
}

static long check_vectors(const char* path) {
    char line[512];
    long count = 0, lineno = 0;
    FILE* f = fopen(path, "r");
    if (!f) {
        printf("cannot open %s\n", path);
        exit(2);
    }
    while (fgets(line, sizeof line, f)) {
        uint32_t out, in, slot, row, col, r, c;
        uint64_t key;
        randmask_mask_t m;
        ++lineno;
        if (line[0] == '#' || strspn(line, " \t\r\n") == strlen(line)) continue;
        if (sscanf(line, "%" SCNu32 " %" SCNu32 " %" SCNu64 " %" SCNu32 " %" SCNu32 " %" SCNu32, &out, &in, &key,
                   &slot, &row, &col) != 6) {
            printf("%s:%ld: cannot parse: %s", path, lineno, line);
            exit(2);
        }
        m = randmask_mask_init(out, in, key);
        if (m.numel == 0) {
            printf("%s:%ld: invalid shape %" PRIu32 "x%" PRIu32 "\n", path, lineno, out, in);
            exit(2);
        }
        randmask_position(&m, slot, &r, &c);
        if (r != row || c != col) fail("slot->flat", out, in, key, slot, (int64_t)r * in + c, (int64_t)row * in + col);
        if (randmask_flat_to_slot(&m, row * in + col) != slot)
            fail("flat->slot", out, in, key, row * in + col, randmask_flat_to_slot(&m, row * in + col), slot);
        if (randmask_slot(&m, row, col, slot + 1) != (int64_t)slot)
            fail("randmask_slot(n=slot+1)", out, in, key, slot, randmask_slot(&m, row, col, slot + 1), slot);
        if (randmask_slot(&m, row, col, slot) != -1)
            fail("randmask_slot(n=slot)", out, in, key, slot, randmask_slot(&m, row, col, slot), -1);
        ++count;
    }
    fclose(f);
    return count;
}

/* Every slot of [0, N) maps into [0, N), no position twice, and flat_to_slot maps it back. */
static void check_bijection(uint32_t out, uint32_t in, uint64_t key) {
    randmask_mask_t m = randmask_mask_init(out, in, key);
    uint32_t n = out * in, k, p;
    unsigned char* seen = (unsigned char*)calloc(n, 1);
    for (k = 0; k < n; ++k) {
        p = randmask_slot_to_flat(&m, k);
        if (p >= n) {
            fail("slot->flat out of range", out, in, key, k, p, n);
            continue;
        }
        if (seen[p]++) fail("slot->flat hits a position twice", out, in, key, k, p, p);
        if (randmask_flat_to_slot(&m, p) != k) fail("flat->slot(slot->flat)", out, in, key, k,
                                                     randmask_flat_to_slot(&m, p), k);
    }
    free(seen);
}

int main(int argc, char** argv) {
    static const uint32_t shapes[][2] = {{1, 1}, {1, 7}, {7, 1}, {7, 5}, {97, 89}, {16, 16}};
    static const uint64_t keys[] = {UINT64_C(0), UINT64_C(0x0123456789ABCDEF), UINT64_C(0xFFFFFFFFFFFFFFFF)};
    long vectors;
    size_t s, k;
    if (argc != 2) {
        printf("usage: %s tests/vectors/mask_scheme1.txt\n", argv[0]);
        return 2;
    }
    vectors = check_vectors(argv[1]);
    if (vectors == 0) {
        printf("no vectors in %s\n", argv[1]);
        return 2;
    }
    for (s = 0; s < sizeof shapes / sizeof shapes[0]; ++s)
        for (k = 0; k < sizeof keys / sizeof keys[0]; ++k) check_bijection(shapes[s][0], shapes[s][1], keys[k]);
    printf("mask scheme %d (%s): %ld vectors, %zu shapes x %zu keys exhaustive: %ld mismatches\n",
           RANDMASK_MASK_SCHEME,
#ifdef __cplusplus
           "C++",
#else
           "C",
#endif
           vectors, sizeof shapes / sizeof shapes[0], sizeof keys / sizeof keys[0], failures);
    return failures ? 1 : 0;
}
