// fuzz_idx: an IDX file of Fashion-MNIST's kind (dit/idx.h), read as images or, when its magic says one
// dimension, as labels. An accepted file must hold exactly the values its header announces.
#include "fuzz.h"
#include "../dit/idx.h"  // defines: IdxData, idx_read

static void read_idx(const uint8_t *data, size_t size) {
    char path[4096];
    fuzz_path(path, sizeof(path), "data.idx");
    fuzz_write_file(path, data, size);
    int dims = size > 3 && data[3] == 1 ? 1 : 3;
    IdxData idx = idx_read(path, dims, dims == 1 ? "labels" : "images");
    size_t values = (size_t)idx.count * idx.rows * idx.cols, sum = 0;
    if (idx.count < 1 || idx.rows < 1 || idx.cols < 1 || 4 + 4 * (size_t)dims + values != size) { abort(); }
    for (size_t i = 0; i < values; i++) { sum += idx.data[i]; }  // every value is there to read
    if (sum > 255 * values) { abort(); }
    free(idx.data);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_run(read_idx, data, size);
    return 0;
}
