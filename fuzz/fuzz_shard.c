// fuzz_shard: a token shard, through the data loader: its checks at the start, then batches
// across an epoch boundary, shuffled or not. Every token handed out must be in the vocabulary.
#include "fuzz.h"
#include "../dataloader.h"

static void read_shard(const uint8_t *data, size_t size) {
    char path[4096];
    fuzz_path(path, sizeof(path), "shard.bin");
    fuzz_write_file(path, data, size);
    DataLoader loader;
    int shuffle = size > 0 && (data[size - 1] & 1);  // the last byte also picks the order
    dataloader_init(&loader, path, 2, 4, shuffle, 1337);
    size_t batches = 2 * loader.num_batches + 1 < 16 ? 2 * loader.num_batches + 1 : 16;
    for (size_t b = 0; b < batches; b++) {
        dataloader_next_batch(&loader);
        for (int i = 0; i < loader.B * loader.T; i++) {
            if (loader.inputs[i] >= loader.vocab_size || loader.targets[i] >= loader.vocab_size) { abort(); }
        }
    }
    long long position[4];
    dataloader_get_position(&loader, position);
    dataloader_set_position(&loader, position, path);
    dataloader_free(&loader);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_run(read_shard, data, size);
    return 0;
}
