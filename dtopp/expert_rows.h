/*
expert_rows.h: the memory of expert parallelism on the CPU (--expert-parallel, dtopp/parallel.h): the
rows a rank computes for its own experts, received from every rank of its group. train_dtopp.c's
experts_forward_parallel and experts_backward_parallel use them; included by it after ExpertRows.
*/
#ifndef EXPERT_ROWS_H
#define EXPERT_ROWS_H

// Expert parallelism (CPU, dtopp/parallel.h): the rows this rank computes for its own experts, sent
// by every rank of its group, all layers one after another. Within a layer they come by source
// rank, then expert, then token, so each source's rows of an expert form the same product as in one
// process that runs the source's micro-batch: the same bits.
struct OwnedRows {
    ExpertRows rows;       // row_token[i] = i: row i reads in[i]
    float *in;             // (R, C) the MoE inputs received
    int *start;            // (L, G, X + 1) source s's rows of this rank's expert j (of X = E/G): start[j] ..
                           // start[j+1]-1 of its block
    int *offset;           // (L + 1) layer l's rows are offset[l] .. offset[l+1]-1
    float *send;           // (capacity, C) this rank's inputs, packed for sending
    int send_capacity;
    ExpertRowGrads grads;  // one layer at a time
    float *dw;             // (3 X H C) one source's gradient of this rank's W1, W3, W2, added in source order
};

// For the training passes of a model of config c on ep_ranks ranks per group.
static OwnedRows *owned_alloc(const ModelConfig *c) {
    size_t L = c->num_layers, X = c->num_experts / ep_ranks;
    OwnedRows *o = (OwnedRows *)calloc_check(1, sizeof(OwnedRows));
    o->start = (int *)calloc_check(L * ep_ranks * (X + 1), sizeof(int));
    o->offset = (int *)calloc_check(L + 1, sizeof(int));
    o->dw = (float *)malloc_check(3 * X * c->expert_hidden * c->channels * sizeof(float));
    return o;
}

static void owned_free(OwnedRows *o) {
    if (o == NULL) { return; }
    ExpertRows *r = &o->rows;
    ExpertRowGrads *g = &o->grads;
    void *buffers[] = {r->row_token, r->h1, r->h3, r->hact, r->out, o->in, o->start, o->offset, o->send,
                       g->dout, g->dh1, g->dh3, g->din, o->dw};
    for (size_t i = 0; i < sizeof(buffers) / sizeof(buffers[0]); i++) { free(buffers[i]); }
    free(o);
}

// Expert parallelism: room for `rows` received rows (their row_token is the identity) and `sent`
// rows to send.
static void owned_reserve(OwnedRows *o, int rows, int sent, int C, int H) {
    int before = o->rows.capacity;
    expert_rows_reserve(&o->rows, rows, C, H);
    if (o->rows.capacity > before) {
        o->in = (float *)realloc_check(o->in, (size_t)o->rows.capacity * C * sizeof(float));
        for (int i = before; i < o->rows.capacity; i++) { o->rows.row_token[i] = i; }
    }
    if (sent > o->send_capacity) {
        o->send_capacity = sent + sent / 4;
        o->send = (float *)realloc_check(o->send, (size_t)o->send_capacity * C * sizeof(float));
    }
}

// The view of the received rows of layer l from `row` on (the gradient scratch holds one layer).
static ExpertView owned_view(OwnedRows *o, int l, int row, int C, int H) {
    size_t first = (size_t)o->offset[l] + row;
    ExpertView x = {0};
    x.row_token = o->rows.row_token + first;
    x.h1 = o->rows.h1 + first * H;
    x.h3 = o->rows.h3 + first * H;
    x.hact = o->rows.hact + first * H;
    x.out = o->rows.out + first * C;
    if (o->grads.dout != NULL) {
        x.dout = o->grads.dout + (size_t)row * C;
        x.dh1 = o->grads.dh1 + (size_t)row * H;
        x.dh3 = o->grads.dh3 + (size_t)row * H;
        x.din = o->grads.din + (size_t)row * C;
    }
    return x;
}

// From the counts of every source (G blocks of X = E/G: its rows of each expert of this rank), the
// layout of layer l's received rows. Returns their number.
static int owned_layout(OwnedRows *o, int l, const int *received, int E) {
    int G = ep_ranks, X = E / G, total = 0;
    for (int s = 0; s < G; s++) {
        int *start = o->start + ((size_t)l * G + s) * (X + 1);
        start[0] = 0;
        for (int j = 0; j < X; j++) { start[j + 1] = start[j] + received[s * X + j]; }
        total += start[X];
    }
    return total;
}

// Source s's rows of layer l as the experts read a RouterView (of this rank's X = E/G experts, whose
// weights it holds): only its expert_start.
static RouterView owned_routing(const OwnedRows *o, int l, int s, int E) {
    RouterView block = {0};
    block.expert_start = o->start + ((size_t)l * ep_ranks + s) * (E / ep_ranks + 1);
    return block;
}

// The rows this rank sends to each rank of its group (its rows of that rank's experts: a block,
// as rows come by expert) and receives from each, in layer l.
static void owned_exchange_sizes(const OwnedRows *o, int l, RouterView r, int E, int *send_rows, int *recv_rows) {
    int G = ep_ranks, X = E / G;
    for (int s = 0; s < G; s++) {
        send_rows[s] = r.expert_start[(s + 1) * X] - r.expert_start[s * X];
        recv_rows[s] = o->start[((size_t)l * G + s) * (X + 1) + X];
    }
}

#endif  // EXPERT_ROWS_H
