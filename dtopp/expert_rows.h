/*
expert_rows.h: the memory of expert parallelism on the CPU (--expert-parallel, dtopp/parallel.h): the
rows a rank computes for its own experts, received from every rank of its group, and the passes
over them: experts_forward_parallel and experts_backward_parallel, which moe_forward and
moe_backward call instead of experts_forward/backward. Included by train_dtopp.c after those.
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

// Expert parallel forward: the counts, then the rows, go to their experts' ranks; this rank runs
// its experts on each source's rows in rank order; the outputs come back to x.out.
static void experts_forward_parallel(OwnedRows *o, int l, ExpertView x, RouterView r, const float *m,
                                     const LayerWeights *w, int E, int C, int H, Precision precision) {
    int G = ep_ranks, counts[E], received[E], send_rows[G], recv_rows[G];  // received: G blocks of E/G
    for (int e = 0; e < E; e++) { counts[e] = r.expert_start[e + 1] - r.expert_start[e]; }
    ep_exchange_counts(counts, received, E / G);
    int total = owned_layout(o, l, received, E);
    owned_reserve(o, o->offset[l] + total, r.expert_start[E], C, H);
    o->offset[l + 1] = o->offset[l] + total;
    owned_exchange_sizes(o, l, r, E, send_rows, recv_rows);
    for (int i = 0; i < r.expert_start[E]; i++) {
        memcpy(o->send + (size_t)i * C, m + (size_t)x.row_token[i] * C, C * sizeof(float));
    }
    ep_exchange_rows(o->send, send_rows, o->in + (size_t)o->offset[l] * C, recv_rows, C);
    ep_note_rows(l, total);
    for (int s = 0, row = 0; s < G; row += recv_rows[s++]) {  // w: this rank's E/G experts
        experts_forward(owned_view(o, l, row, C, H), owned_routing(o, l, s, E), o->in, w, E / G, C, H,
                        precision);
    }
    ep_exchange_rows(o->rows.out + (size_t)o->offset[l] * C, recv_rows, x.out, send_rows, C);
}

// Expert parallel backward, the forward reversed: x.dout goes to the experts' ranks, each source's
// rows run backward in rank order, and x.din comes back. Source 0's expert gradient lands in dw,
// each later one in scratch that is then added: ((g0 + g1) + g2) ..., as micro-batches add. w, dw:
// this rank's E/G experts.
static void experts_backward_parallel(OwnedRows *o, int l, ExpertView x, RouterView r, const LayerWeights *dw,
                                      const LayerWeights *w, int E, int C, int H, Precision precision) {
    int G = ep_ranks, X = E / G, send_rows[G], recv_rows[G];
    size_t HC = (size_t)H * C, size = X * HC;
    owned_exchange_sizes(o, l, r, E, send_rows, recv_rows);
    expert_row_grads_reserve(&o->grads, o->offset[l + 1] - o->offset[l], C, H);
    ep_exchange_rows(x.dout, send_rows, o->grads.dout, recv_rows, C);
    LayerWeights scratch = {.w1 = o->dw, .w3 = o->dw + size, .w2 = o->dw + 2 * size};
    float *sums[] = {dw->w1, dw->w3, dw->w2}, *parts[] = {scratch.w1, scratch.w3, scratch.w2};
    for (int s = 0, row = 0; s < G; row += recv_rows[s++]) {
        RouterView block = owned_routing(o, l, s, E);
        for (int k = 0; k < 3 && s > 0; k++) { memset(parts[k], 0, size * sizeof(float)); }
        experts_backward(owned_view(o, l, row, C, H), block, o->in, s == 0 ? dw : &scratch, w, X, C, H,
                         precision);
        for (int k = 0; k < 3 && s > 0; k++) {
            #pragma omp parallel for
            for (size_t i = 0; i < size; i++) { sums[k][i] += parts[k][i]; }
        }
    }
    ep_exchange_rows(o->grads.din, recv_rows, x.din, send_rows, C);
}

#endif  // EXPERT_ROWS_H
