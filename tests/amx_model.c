/* A software model of the AMX instructions lowbit's W8A8 GEMM uses (lowbit.targets.x86_amx), for
 * testing that kernel on CPUs without AMX. Each function has the operands of the LLVM intrinsic of
 * its name and follows the instruction's definition in Intel's SDM (vol. 2, "TDPBSUD", "TILELOADD",
 * "LDTILECFG"): a per-thread configuration (palette 1: 8 tiles, each of rows x bytes per row, at
 * most 16 x 64), tiles that only exist once configured, and the shapes each instruction demands.
 * Anything the hardware would fault on aborts the process instead. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TILES 8
#define MAX_ROWS 16
#define MAX_BYTES 64

static long tile_products; /* tdpbsud instructions executed, all threads */
static __thread int configured;
static __thread uint8_t rows[TILES];
static __thread uint16_t bytes[TILES];
static __thread uint8_t tile[TILES][MAX_ROWS][MAX_BYTES];

static void fault(const char *what) {
    fprintf(stderr, "amx model: %s\n", what);
    abort();
}

static void check(uint8_t t) {
    if (!configured) fault("tile instruction before ldtilecfg (or after tilerelease)");
    if (t >= TILES || rows[t] == 0) fault("tile not configured");
}

int32_t amx_model_ldtilecfg(const uint8_t *config) {
    if (config[0] != 1) fault("palette is not 1");
    for (int i = 2; i < 16; ++i)
        if (config[i]) fault("reserved configuration bytes are not zero");
    for (int i = 16 + 2 * TILES; i < 48; ++i)
        if (config[i]) fault("palette 1 has 8 tiles: bytes per row of tiles 8-15 must be zero");
    for (int i = 48 + TILES; i < 64; ++i)
        if (config[i]) fault("palette 1 has 8 tiles: rows of tiles 8-15 must be zero");
    for (int t = 0; t < TILES; ++t) {
        memcpy(&bytes[t], config + 16 + 2 * t, 2);
        rows[t] = config[48 + t];
        if (rows[t] > MAX_ROWS || bytes[t] > MAX_BYTES || (rows[t] == 0) != (bytes[t] == 0))
            fault("tile shape out of range");
    }
    memset(tile, 0, sizeof tile);
    configured = 1;
    return 0;
}

int32_t amx_model_tilezero(uint8_t t) {
    check(t);
    memset(tile[t], 0, sizeof tile[t]);
    return 0;
}

int32_t amx_model_tileloadd64(uint8_t t, const uint8_t *base, int64_t stride) {
    check(t);
    for (int r = 0; r < rows[t]; ++r) memcpy(tile[t][r], base + r * stride, bytes[t]);
    return 0;
}

int32_t amx_model_tilestored64(uint8_t t, uint8_t *base, int64_t stride) {
    check(t);
    for (int r = 0; r < rows[t]; ++r) memcpy(base + r * stride, tile[t][r], bytes[t]);
    return 0;
}

/* dst[m][n] += sum_k sum_i int8(a[m][4k + i]) * uint8(b[k][4n + i]), int32 lanes wrapping. */
int32_t amx_model_tdpbsud(uint8_t dst, uint8_t a, uint8_t b) {
    __atomic_fetch_add(&tile_products, 1, __ATOMIC_RELAXED);
    check(dst);
    check(a);
    check(b);
    if (rows[a] != rows[dst] || bytes[b] != bytes[dst] || rows[b] * 4 != bytes[a] || bytes[dst] % 4)
        fault("tdpbsud operand shapes do not agree");
    /* the thread's tiles by plain pointers: every access to a __thread variable of a library that
       was loaded with dlopen calls __tls_get_addr */
    uint8_t(*c)[MAX_BYTES] = tile[dst];
    const uint8_t(*x)[MAX_BYTES] = (const uint8_t(*)[MAX_BYTES])tile[a];
    const uint8_t(*w)[MAX_BYTES] = (const uint8_t(*)[MAX_BYTES])tile[b];
    const int m_rows = rows[dst], n_lanes = bytes[dst] / 4, k_rows = rows[b];
    for (int m = 0; m < m_rows; ++m)
        for (int n = 0; n < n_lanes; ++n) {
            uint32_t acc;
            memcpy(&acc, &c[m][4 * n], 4);
            for (int k = 0; k < k_rows; ++k)
                for (int i = 0; i < 4; ++i)
                    acc += (uint32_t)((int32_t)(int8_t)x[m][4 * k + i] * (int32_t)w[k][4 * n + i]);
            memcpy(&c[m][4 * n], &acc, 4);
        }
    return 0;
}

int32_t amx_model_tilerelease(void) {
    configured = 0;
    return 0;
}

/* How many tile products (tdpbsud) have run since the library was loaded. */
long amx_model_tile_products(void) { return __atomic_load_n(&tile_products, __ATOMIC_RELAXED); }
