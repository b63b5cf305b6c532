/*
attention_reference.h: self-attention as the math writes it, with every head's probabilities
P (B, NH, T, T) computed whole and kept for the backward pass. train_dtopp.c's attention
(dtopp/attention.h) computes the same without P, in tiles with an online softmax; test/test_matmul
checks it against these. Memory here grows with T², which is why the model does not use them.
Needs train_dtopp.c (softmax_row) and dtopp/matmul.h (matmul_nt, matmul_nn, matmul_tn) first.
*/
#ifndef ATTENTION_REFERENCE_H
#define ATTENTION_REFERENCE_H

// Self-attention. For sequence b and head h, with q, k, v the head's (T, hd) columns of qkv:
//   scores = q · k^T / sqrt(hd)                      (T, T)
//   the causal mask: query t sees keys 0 .. t (causal = 0: every key, as the DiT's patches do)
//   P = the softmax of each row over the keys it sees, 0 elsewhere; att (B, NH, T, T) keeps it
//   out = P · v                                      (T, hd), the head's columns of out (B, T, C)
// The queries go in blocks of ATTENTION_BLOCK, and a block computes only the keys up to its last
// query: the masked triangle costs at most one block of extra products. Each thread owns whole
// (b, h) pairs; matmul_nt and matmul_nn (matmul.h) are products on the calling thread.
#define ATTENTION_BLOCK 64

void attention_forward_reference(float *out, float *att, const float *qkv, int B, int T, int C, int NH,
                                 int causal) {
    int hd = C / NH;
    size_t ld = 3 * (size_t)C;  // between the rows of q, k and v in qkv
    #pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            const float *q = qkv + (size_t)b * T * ld + h * hd, *k = q + C, *v = q + 2 * C;
            float *P = att + ((size_t)b * NH + h) * T * T, *o = out + (size_t)b * T * C + h * hd;
            for (int t0 = 0; t0 < T; t0 += ATTENTION_BLOCK) {
                int t1 = t0 + ATTENTION_BLOCK < T ? t0 + ATTENTION_BLOCK : T, n_keys = causal ? t1 : T;
                float *scores = P + (size_t)t0 * T;  // rows t0 .. t1-1
                matmul_nt(scores, T, q + t0 * ld, ld, k, ld, t1 - t0, n_keys, hd, 0, FLOAT32);  // q · k^T
                for (int t = t0; t < t1; t++) {
                    int seen = causal ? t + 1 : T;
                    softmax_row(P + (size_t)t * T, seen, 1.0f / sqrtf((float)hd));
                    for (int j = seen; j < n_keys; j++) { P[(size_t)t * T + j] = 0.0f; }  // the mask
                }
                matmul_nn(o + (size_t)t0 * C, C, scores, T, v, ld, t1 - t0, hd, n_keys, 0, FLOAT32);  // P · v
            }
        }
    }
}

// The same reversed: dP = dout · v^T; through the softmax dS = P ⊙ (dP − rowsum(P ⊙ dP)) / sqrt(hd);
// then dq += dS · k, dk += dS^T · q, dv += P^T · dout. The queries go in blocks in order, so every
// sum over queries runs in the same order for any number of threads; each thread keeps dS of its
// current block in a scratch of its own.
void attention_backward_reference(float *dqkv, const float *dout, const float *qkv, const float *att, int B,
                                  int T, int C, int NH, int causal) {
    int hd = C / NH;
    size_t ld = 3 * (size_t)C;
    float scale = 1.0f / sqrtf((float)hd);
    #pragma omp parallel
    {
        float *dS = (float *)malloc_check((size_t)ATTENTION_BLOCK * T * sizeof(float));
        #pragma omp for collapse(2) schedule(dynamic, 1)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < NH; h++) {
                const float *q = qkv + (size_t)b * T * ld + h * hd, *k = q + C, *v = q + 2 * C;
                const float *P = att + ((size_t)b * NH + h) * T * T, *d = dout + (size_t)b * T * C + h * hd;
                float *dq = dqkv + (size_t)b * T * ld + h * hd, *dk = dq + C, *dv = dq + 2 * C;
                for (int t0 = 0; t0 < T; t0 += ATTENTION_BLOCK) {
                    int t1 = t0 + ATTENTION_BLOCK < T ? t0 + ATTENTION_BLOCK : T, n_keys = causal ? t1 : T;
                    int n_queries = t1 - t0;
                    matmul_nt(dS, n_keys, d + (size_t)t0 * C, C, v, ld, n_queries, n_keys, hd, 0, FLOAT32);  // dP
                    for (int t = t0; t < t1; t++) {
                        const float *p = P + (size_t)t * T;
                        float *ds = dS + (size_t)(t - t0) * n_keys, pdp = 0.0f;
                        int seen = causal ? t + 1 : T;
                        #pragma omp simd reduction(+ : pdp)
                        for (int j = 0; j < seen; j++) { pdp += p[j] * ds[j]; }
                        for (int j = 0; j < seen; j++) { ds[j] = p[j] * (ds[j] - pdp) * scale; }
                        for (int j = seen; j < n_keys; j++) { ds[j] = 0.0f; }
                    }
                    matmul_nn(dq + t0 * ld, ld, dS, n_keys, k, ld, n_queries, hd, n_keys, 1, FLOAT32);
                    matmul_tn(dk, ld, dS, n_keys, q + t0 * ld, ld, n_keys, hd, n_queries, 1, FLOAT32);
                    matmul_tn(dv, ld, P + (size_t)t0 * T, T, d + (size_t)t0 * C, C, n_keys, hd, n_queries, 1, FLOAT32);
                }
            }
        }
        free(dS);
    }
}

#endif  // ATTENTION_REFERENCE_H
