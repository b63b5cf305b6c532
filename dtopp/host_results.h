/*
host_results.h: the CPU build's copies of what tests and tools read: the results of the last
forward/backward pass and the model's buffers (train_dtopp.cu has the same functions, copying from
the device). Included by train_dtopp.c in its CPU section.
*/
#ifndef HOST_RESULTS_H
#define HOST_RESULTS_H

void model_get_logits(const Model *model, float *out) {  // (N, V)
    memcpy(out, model->ws->acts.acts.logits,
           (size_t)model->ws->acts.B * model->ws->acts.T * model->config.vocab_size * sizeof(float));
}

void model_get_losses(const Model *model, float *out) {  // total, CE, LB_l for each l, H_l for each l
    int L = model->config.num_layers;
    out[0] = model->loss;
    out[1] = model->ce_loss;
    memcpy(out + 2, model->ws->acts.acts.aux_lb, L * sizeof(float));
    memcpy(out + 2 + L, model->ws->acts.acts.aux_ent, L * sizeof(float));
}

// n_selected (L, N), selected (L, N, E), gates (L, N, E), as in the reference fixtures.
void model_get_routing(const Model *model, int *n_selected, int *selected, float *gates) {
    size_t LN = (size_t)model->config.num_layers * model->ws->acts.B * model->ws->acts.T,
           E = model->config.num_experts;
    memcpy(n_selected, model->ws->acts.routing.n_selected, LN * sizeof(int));
    memcpy(selected, model->ws->acts.routing.selected, LN * E * sizeof(int));
    memcpy(gates, model->ws->acts.acts.gates, LN * E * sizeof(float));
}

// The gradients, parameters and moments this process holds (num_held: with --expert-parallel, of its
// own experts), laid out as the model file with those experts.
void model_get_grads(const Model *model, float *out) {
    memcpy(out, model->grads_memory, model->num_held * sizeof(float));
}

void model_get_params(const Model *model, float *out) {
    memcpy(out, model->params_memory, model->num_held * sizeof(float));
}

void model_get_theta(const Model *model, float *out) {
    memcpy(out, model->params.theta, model->config.num_layers * sizeof(float));
}

void model_get_token_losses(const Model *model, float *out) {
    memcpy(out, model->ws->acts.acts.token_loss, (size_t)model->B * model->T * sizeof(float));
}

// (L, N, E) each: the logits the router's softmax took (the DRN-scaled θ·u, or z without DRN), and P.
void model_get_router(const Model *model, float *logits, float *probs) {
    const ActivationTensors *t = &model->ws->acts.acts;
    size_t NE = (size_t)model->B * model->T * model->config.num_experts, L = model->config.num_layers;
    memcpy(probs, t->probs, L * NE * sizeof(float));
    memcpy(logits, model->router.drn ? t->drn_u : t->router_logits, L * NE * sizeof(float));
    for (size_t i = 0; model->router.drn && i < L * NE; i++) { logits[i] *= model->params.theta[i / NE]; }
}

void model_get_moments(const Model *model, float *m, float *v) {
    if (model->m_memory == NULL) {  // no step taken yet: the moments are zero
        memset(m, 0, model->num_held * sizeof(float));
        memset(v, 0, model->num_held * sizeof(float));
        return;
    }
    memcpy(m, model->m_memory, model->num_held * sizeof(float));
    memcpy(v, model->v_memory, model->num_held * sizeof(float));
}

void model_set_moments(Model *model, const float *m, const float *v) {
    if (model->m_memory == NULL) {
        model->m_memory = (float *)malloc_check(model->num_held * sizeof(float));
        model->v_memory = (float *)malloc_check(model->num_held * sizeof(float));
    }
    memcpy(model->m_memory, m, model->num_held * sizeof(float));
    memcpy(model->v_memory, v, model->num_held * sizeof(float));
}

#endif  // HOST_RESULTS_H
