/*
explain.h: --explain, the routing of a text made visible (doc/reading_the_router.md).

  train_dtopp --init MODEL --explain TEXT [--html PAGE.html] [--explain-window N] [--routing-dump FILE]

runs the model's forward pass on the text and shows, token by token and layer by layer, how many
experts the router activated. With --html it writes one self-contained page (html.h): the text
shaded by |S| for a layer the reader picks or the mean over layers, or by the model's surprise at
each token; a token's details per layer on hover or click (its experts in router order with their
DRN-scaled logits, probabilities and running sum against p, the chosen set, its losses); and a
summary (per-layer histograms of |S|, expert loads, p, θ, the budget, the configuration). Without
--html the text is printed with ANSI background colours and a legend, for a look over ssh.
--routing-dump writes the same forward pass in the format of training's dump (logging.h).

Token i is the input of position i and token i+1 its target, as in training, so a text of n
tokens routes n - 1 positions and its last token is only a target. A text longer than the window
(the model's longest sequence, or --explain-window) goes through in windows, each a forward pass
of its own whose first tokens see none of the text before; the page and the terminal say so.
It uses the model API of train_dtopp.c (model_get_routing, model_get_router, ...), sampler.h's
TextCodec and logging.h's dump_routing, so it is included after them.
*/
#ifndef EXPLAIN_H
#define EXPLAIN_H

#include "html.h"  // defines: html_begin, html_end, json_string, json_ints, json_floats, HTML_SHADE_JS, shade_ansi

typedef struct {
    int n;          // tokens of the text
    int *tokens;    // (n)
    int N;          // routed positions: n - 1
    int window, windows;
    int L, E;
    int *n_selected;  // (L, N) |S|
    int *order;       // (L, N, E) the experts in router order: S first, as the model chose it, then the rest by P
    float *probs;     // (L, N, E) P of the expert at each place of `order`
    float *logits;    // (L, N, E) the logit the softmax took (θ·u with DRN, z without), same order
    float *cum;       // (L, N, E) the running sum of P in that order, in float as select_experts adds it
    float *loss;      // (N) the loss of position i: -log P(token i+1 | its window's tokens up to i)
} Explanation;

// The forward pass of the text, window by window; with dump, training's routing dump of each window.
static void explain_forward(Model *model, Explanation *x, FILE *dump) {
    const ModelConfig *c = &model->config;
    int L = x->L = c->num_layers, E = x->E = c->num_experts, N = x->N, W = x->window;
    x->windows = (N + W - 1) / W;
    size_t LNE = (size_t)L * N * E;
    x->n_selected = (int *)malloc_check((size_t)L * N * sizeof(int));
    x->order = (int *)malloc_check(LNE * sizeof(int));
    x->probs = (float *)malloc_check(LNE * sizeof(float));
    x->logits = (float *)malloc_check(LNE * sizeof(float));
    x->cum = (float *)malloc_check(LNE * sizeof(float));
    x->loss = (float *)malloc_check((size_t)N * sizeof(float));
    int *counts = (int *)malloc_check((size_t)L * W * sizeof(int));
    int *selected = (int *)malloc_check((size_t)L * W * E * sizeof(int));
    float *gates = (float *)malloc_check((size_t)L * W * E * sizeof(float));
    unsigned char *used = (unsigned char *)malloc_check(E);
    float *z = (float *)malloc_check((size_t)L * W * E * sizeof(float));
    float *P = (float *)malloc_check((size_t)L * W * E * sizeof(float));
    for (int start = 0; start < N; start += W) {
        int T = N - start < W ? N - start : W;
        model_forward(model, x->tokens + start, x->tokens + start + 1, 1, T);
        model_get_routing(model, counts, selected, gates);
        model_get_router(model, z, P);
        model_get_token_losses(model, x->loss + start);
        if (dump != NULL) { dump_routing(dump, model, x->tokens + start, start == 0); }
        for (int l = 0; l < L; l++) {
            for (int t = 0; t < T; t++) {
                size_t in = ((size_t)l * T + t) * E, out = ((size_t)l * N + start + t) * E;
                int s = x->n_selected[(size_t)l * N + start + t] = counts[(size_t)l * T + t];
                int *order = x->order + out;
                memset(used, 0, E);
                for (int j = 0; j < s; j++) { used[order[j] = selected[in + j]] = 1; }
                for (int j = s; j < E; j++) {  // the rest by P descending, ties: lower index first
                    int best = -1;
                    for (int e = 0; e < E; e++) {
                        if (!used[e] && (best < 0 || P[in + e] > P[in + best])) { best = e; }
                    }
                    used[order[j] = best] = 1;
                }
                float kept = 0.0f;
                for (int j = 0; j < E; j++) {
                    x->probs[out + j] = P[in + order[j]];
                    x->logits[out + j] = z[in + order[j]];
                    x->cum[out + j] = kept += P[in + order[j]];
                }
            }
        }
    }
    free(counts);
    free(selected);
    free(gates);
    free(used);
    free(z);
    free(P);
}

// The bytes of a token; a byte of a byte-level vocabulary goes to `byte`.
static const unsigned char *explain_token_bytes(const TextCodec *codec, int token, unsigned char *byte, size_t *len) {
    if (codec->byte_level) {
        *byte = (unsigned char)token;
        *len = 1;
        return byte;
    }
    return tokenizer_decode(&codec->tokenizer, token, len);
}

static const char *explain_budget(const RouterConfig *rc, char *text, size_t size) {
    if (rc->routing == ROUTING_TOPK) { snprintf(text, size, "%d experts per token (top-k)", rc->k); }
    else if (rc->routing == ROUTING_TOPP) { snprintf(text, size, "none: a fixed p = %.3f (top-p)", rc->p); }
    else { snprintf(text, size, "%.2f experts per token on average (the controller's target)", rc->tgt); }
    return text;
}

static double explain_mean_loss(const Explanation *x) {
    double sum = 0.0;
    for (int i = 0; i < x->N; i++) { sum += x->loss[i]; }
    return sum / x->N;
}

// The page's own style, beyond html.h's.
#define EXPLAIN_CSS                                                                                            \
    "<style>\n.main{display:flex;gap:18px;align-items:flex-start}\n"                                         \
    ".left{flex:3;min-width:0}\n#text{white-space:pre-wrap;overflow-wrap:anywhere;"                           \
    "font:15px/1.95 ui-monospace,Menlo,Consolas,"                                                             \
    "monospace}\n.tok{padding:2px 0;border-right:1px solid rgba(0,0,0,.22);cursor:pointer}\n"                 \
    "#text.nobounds .tok{border-right:none}\n.tok.last{background:#eee;color:#888}\n"                         \
    ".tok.sel{outline:2px solid #1565c0;outline-offset:-1px}\n.wstart{color:#1565c0;font-weight:bold}\n"      \
    "#details{flex:2;position:sticky;top:8px;max-height:94vh;overflow:auto;border:1px solid #ddd;"           \
    "border-radius:6px;padding:8px 10px;font-size:13px;min-width:360px}\n"                                   \
    ".tokhead{font-size:15px;margin-bottom:4px}.layer{margin-top:8px}.lh{font-weight:600;margin-bottom:2px}\n" \
    "tr.out td{color:#999}code.big{font-size:16px;background:#f4f4f4;padding:0 4px}\n"                       \
    ".cum{display:inline-block;position:relative;width:110px;height:10px;background:#f0f0f0;"                \
    "vertical-align:middle}\n.cum span{position:absolute;left:0;top:0;bottom:0}.cum span.in{background:#2e7d32}" \
    ".cum span.out{background:#c8c8c8}\n.cum i{position:absolute;top:-3px;bottom:-3px;width:2px;"             \
    "background:#c62828}\n.bar.load{background:#3f6fb5}\n</style>\n"

// The page's script: it draws the text, the details and the summary from the data (JSON) above it.
static const char explain_js[] =
    "const D=JSON.parse(document.getElementById('data').textContent);\n"
    "const L=D.L,E=D.E,N=D.loss.length,n=D.tokens.length,$=id=>document.getElementById(id);\n"
    "const fmt=(x,d)=>Number(x).toFixed(d);\n"
    "const esc=s=>s.replace(/&/g,'&amp;').replace(/</g,'&lt;').replace(/>/g,'&gt;');\n"
    "const show=t=>t.replace(/\\n/g,'↵').replace(/\\t/g,'→').replace(/ /g,'␣');\n"
    "function meanS(i){let s=0;for(let l=0;l<L;l++)s+=D.S[l][i];return s/L;}\n"
    "const surprise=i=>i>0?D.loss[i-1]:NaN;\n"
    "const maxLoss=D.loss.reduce((a,b)=>Math.max(a,b),1e-6);\n"
    "function value(i,mode){if(i>=N)return NaN;if(mode==='mean')return meanS(i);if(mode==='loss')return surprise(i);r"
    "eturn D.S[+mode][i];}\n"
    "const scaled=(v,mode)=>mode==='loss'?v/maxLoss:(v-1)/Math.max(E-1,1);\n"
    "const box=$('text'),spans=[];\n"
    "for(let i=0;i<n;i++){\n"
    "  if(i>0&&i<N&&i%D.window===0){const m=document.createElement('span');m.className='wstart';m.textContent='¦';\n"
    "    m.title='window '+(i/D.window+1)+' starts here: a new forward pass, which sees none of the text before';box."
    "appendChild(m);}\n"
    "  const s=document.createElement('span'),t=D.tokens[i];\n"
    "  s.className='tok'+(i>=N?' last':'');s.dataset.i=i;s.textContent=t.replace(/\\n/g,'↵').replace(/\\t/g,'→');\n"
    "  box.appendChild(s);spans.push(s);\n"
    "  if(t.indexOf('\\n')>=0)box.appendChild(document.createElement('br'));\n"
    "}\n"
    "function legend(mode){\n"
    "  let h='';\n"
    "  if(mode==='loss'){for(const v of [0,maxLoss/4,maxLoss/2,3*maxLoss/4,maxLoss])\n"
    "    h+='<span style=\"background:'+shade(v/maxLoss)+';color:'+ink(v/maxLoss)+'\">'+fmt(v,1)+'</span>';\n"
    "    return 'surprise, nats: '+h;}\n"
    "  for(let s=1;s<=E;s++){const t=scaled(s,mode);h+='<span style=\"background:'+shade(t)+';color:'+ink(t)+'\">'+s+"
    "'</span>';}\n"
    "  return (mode==='mean'?'activated experts, mean over the '+L+' layers: ':'activated experts in layer '+mode+': "
    "')+h;\n"
    "}\n"
    "function recolor(){\n"
    "  const mode=$('shade').value;\n"
    "  spans.forEach((s,i)=>{const v=value(i,mode);if(i>=N)return;const t=scaled(v,mode);\n"
    "    s.style.background=isNaN(v)?'#eee':shade(t);s.style.color=isNaN(v)?'#888':ink(t);\n"
    "    s.title='token '+i+': '+(mode==='loss'?(isNaN(v)?'no surprise (first token)':fmt(v,3)+' nats'):fmt(v,2)+' ex"
    "perts');});\n"
    "  $('legend').innerHTML=legend(mode);\n"
    "}\n"
    "function details(i){\n"
    "  const d=$('details');d.dataset.token=i;\n"
    "  if(i>=N){d.innerHTML='<div class=\"tokhead\">token '+i+' <code class=\"big\">'+esc(show(D.tokens[i]))+\n"
    "    '</code></div><p>The last token of the text is only the target of the position before it: it is not routed.'"
    "+\n"
    "    ' Its surprise: <b id=\"d-surprise\">'+fmt(surprise(i),4)+'</b> nats.</p>';return;}\n"
    "  let h='<div class=\"tokhead\">token '+i+' <code class=\"big\">'+esc(show(D.tokens[i]))+'</code> <span class=\""
    "hint\">window '+\n"
    "    (Math.floor(i/D.window)+1)+', position '+(i%D.window)+'</span></div>';\n"
    "  h+='<div>surprise of this token, −log P(token | the text before it): <b id=\"d-surprise\">'+(i>0?fmt(surprise("
    "i),4):'–')+'</b> nats'+\n"
    "    (i>0&&i%D.window===0?' (predicted at the end of the previous window)':'')+'</div>';\n"
    "  h+='<div>loss at this position, predicting the next token <code>'+esc(show(D.tokens[i+1]))+'</code>: <b id=\"d"
    "-loss\">'+\n"
    "    fmt(D.loss[i],4)+'</b> nats</div>';\n"
    "  h+='<div>activated experts: <b id=\"d-mean\">'+fmt(meanS(i),2)+'</b> on average over the '+L+' layers</div>';\n"
    "  for(let l=0;l<L;l++){\n"
    "    const s=D.S[l][i],p=D.p[l],base=(l*N+i)*E;\n"
    "    h+='<div class=\"layer\" data-layer=\"'+l+'\" data-s=\"'+s+'\" data-p=\"'+p+'\"><div class=\"lh\">layer '+l+': |S| = <b>'+s+'"
    "</b>';\n"
    "    if(D.topp){const before=s>1?D.cum[base+s-2]:0;\n"
    "      h+=' <span class=\"hint\">kept while the sum before an expert was below p = '+fmt(p,3)+': the sum reached "
    "'+\n"
    "        fmt(D.cum[base+s-1],4)+' at expert '+s+(s===E&&D.cum[base+s-1]<p?' (every expert)':'')+'</span>';}\n"
    "    else h+=' <span class=\"hint\">top-k: the first '+D.k+'</span>';\n"
    "    h+='</div><table><tr><th>rank</th><th>expert</th><th>'+(D.drn?'θ·u':'z')+'</th><th>P</th><th>Σ P</th><th>'+\n"
    "      (D.topp?'Σ P against p':'')+'</th></tr>';\n"
    "    for(let j=0;j<E;j++){const k=base+j,c=j<s?'in':'out';\n"
    "      h+='<tr class=\"'+c+'\"><td>'+(j+1)+'</td><td>'+D.order[k]+'</td><td>'+fmt(D.z[k],3)+'</td><td>'+fmt(D.P[k"
    "],4)+\n"
    "        '</td><td>'+fmt(D.cum[k],4)+'</td><td>'+(D.topp?'<span class=\"cum\"><span class=\"'+c+'\" style=\"width"
    ":'+\n"
    "        (100*Math.min(1,D.cum[k]))+'%\"></span><i style=\"left:'+(100*p)+'%\"></i></span>':'')+'</td></tr>';}\n"
    "    h+='</table></div>';\n"
    "  }\n"
    "  d.innerHTML=h;\n"
    "}\n"
    "let pinned=-1;\n"
    "function pin(i){if(pinned>=0)spans[pinned].classList.remove('sel');pinned=i;if(i>=0){spans[i].classList.add('sel"
    "');details(i);}}\n"
    "box.addEventListener('mouseover',e=>{const i=e.target.dataset.i;if(i!==undefined&&pinned<0)details(+i);});\n"
    "box.addEventListener('click',e=>{const i=e.target.dataset.i;if(i!==undefined)pin(pinned===+i?-1:+i);});\n"
    "$('shade').addEventListener('change',recolor);\n"
    "$('bounds').addEventListener('change',e=>box.classList.toggle('nobounds',!e.target.checked));\n"
    "function summary(){\n"
    "  let h='<tr><th>layer</th>'+(D.topp?'<th>p</th>':'')+(D.drn?'<th>θ</th>':'')+'<th>mean |S|</th><th>σ</th><th>|S"
    "| = 1 … '+E+\n"
    "    '</th><th title=\"the share of the layer’s token-expert pairs that each expert took\">expert load, 0 … '+(E-"
    "1)+'</th></tr>';\n"
    "  const all=[];\n"
    "  for(let l=0;l<L;l++){\n"
    "    const hist=new Array(E+1).fill(0),load=new Array(E).fill(0);let sum=0,sq=0;\n"
    "    for(let i=0;i<N;i++){const s=D.S[l][i];hist[s]++;sum+=s;sq+=s*s;for(let j=0;j<s;j++)load[D.order[(l*N+i)*E+j"
    "]]++;}\n"
    "    const mean=sum/N,sd=Math.sqrt(Math.max(0,sq/N-mean*mean));all.push(mean);\n"
    "    const hmax=Math.max(...hist),lmax=Math.max(...load);\n"
    "    let hb='',lb='';\n"
    "    for(let s=1;s<=E;s++)hb+='<span class=\"bar\" title=\"|S| = '+s+': '+hist[s]+' tokens\" style=\"height:'+(2+"
    "28*hist[s]/hmax)+'px\"></span>';\n"
    "    for(let e=0;e<E;e++)lb+='<span class=\"bar load\" title=\"expert '+e+': '+fmt(100*load[e]/sum,1)+'%\" style="
    "\"height:'+(2+28*load[e]/lmax)+'px\"></span>';\n"
    "    h+='<tr id=\"sum-'+l+'\"><td>'+l+'</td>'+(D.topp?'<td>'+fmt(D.p[l],3)+'</td>':'')+(D.drn?'<td>'+fmt(D.theta["
    "l],3)+'</td>':'')+\n"
    "      '<td class=\"mean\">'+fmt(mean,3)+'</td><td>'+fmt(sd,2)+'</td><td>'+hb+'</td><td>'+lb+'</td></tr>';\n"
    "  }\n"
    "  h+='<tr><td>all</td>'+(D.topp?'<td></td>':'')+(D.drn?'<td></td>':'')+'<td class=\"mean\" id=\"sum-all\">'+\n"
    "    fmt(all.reduce((a,b)=>a+b,0)/L,3)+'</td><td colspan=\"3\" class=\"hint\">mean over the layers</td></tr>';\n"
    "  $('summary').innerHTML=h;\n"
    "}\n"
    "summary();\n"
    "const q=new URLSearchParams(location.hash.slice(1));\n"
    "if(q.has('shade'))$('shade').value=q.get('shade');\n"
    "recolor();\n"
    "if(q.has('token')){const i=Math.max(0,Math.min(n-1,+q.get('token')||0));pin(i);}\n";

static void explain_write_html(const Explanation *x, const Model *model, const TextCodec *codec,
                               const char *model_path, const char *text_path, const char *path) {
    const ModelConfig *c = &model->config;
    const RouterConfig *rc = &model->router;
    int L = x->L, E = x->E, N = x->N, topp = rc->routing != ROUTING_TOPK;
    char tmp[4096], title[512], budget[128];
    snprintf(title, sizeof(title), "Routing of %s by %s", text_path, model_path);
    FILE *f = open_for_atomic_write(path, tmp, sizeof(tmp));
    html_begin(f, title);
    fputs(EXPLAIN_CSS, f);
    fputs("<h1>How the router of <code id=\"model\"></code> spends its experts on "
          "<code id=\"textfile\"></code></h1>\n", f);
    fprintf(f, "<p class=\"meta\" id=\"config\">model: L=%d layers, C=%d, NH=%d heads, E=%d experts of hidden width "
            "H=%d, V=%d tokens (%s), longest sequence %d; routing <b>%s</b>%s, DRN %s, gates %s</p>\n",
            L, c->channels, c->num_heads, E, c->expert_hidden, c->vocab_size, vocab_kind_name(c->vocab_kind),
            c->max_seq_len, routing_names[rc->routing],
            rc->routing != ROUTING_DTOPP            ? ""
            : rc->controller == CONTROLLER_LAYER ? " (one p per layer)"
                                                 : " (one p for all layers)",
            rc->drn ? "on" : "off", rc->renorm ? "renormalised over S" : "raw");
    fprintf(f, "<p class=\"meta\">budget: %s; %s p = <b id=\"p0\">%.3f</b>%s, as the model file holds it</p>\n",
            explain_budget(rc, budget, sizeof(budget)),
            rc->routing == ROUTING_DTOPP ? "the threshold the controller reached in training:" : "threshold:",
            topp ? model->threshold[0] : 0.0f,
            rc->controller == CONTROLLER_LAYER && L > 1 ? " in layer 0 (each layer's in the summary)" : "");
    fprintf(f, "<p class=\"meta\" id=\"counts\"><b>%d</b> tokens, <b>%d</b> routed positions (the last token is only a "
            "target); mean loss <b>%.4f</b> nats per token</p>\n", x->n, N, explain_mean_loss(x));
    if (x->windows > 1) {
        fprintf(f, "<p class=\"note\" id=\"windows\">The text is longer than the window of %d tokens: "
                "it went through in "
                "<b>%d windows</b>, each a forward pass of its own, whose first tokens see none of the text before "
                "(a window starts at ¦).</p>\n", x->window, x->windows);
    }
    fputs("<div class=\"controls\"><label>shade by <select id=\"shade\"><option value=\"mean\">activated experts, "
          "mean over layers</option>", f);
    for (int l = 0; l < L; l++) { fprintf(f, "<option value=\"%d\">activated experts, layer %d</option>", l, l); }
    fputs("<option value=\"loss\">surprise (loss at the token)</option></select></label>\n<span class=\"legend\" "
          "id=\"legend\"></span><label><input type=\"checkbox\" id=\"bounds\" checked> token boundaries</label>"
          "<span class=\"hint\">hover a token for its routing; click to pin it</span></div>\n"
          "<div class=\"main\"><div class=\"left\"><div id=\"text\"><noscript>This page draws the text with "
          "JavaScript.</noscript></div>\n<h2>Summary over the text</h2><table id=\"summary\"></table></div>\n"
          "<div id=\"details\">Hover over a token, or click it, to see its experts in every layer.</div></div>\n", f);
    fprintf(f, "<h2>How to read it</h2><p class=\"hint\">In every layer the router scores the %d experts "
            "(logits z = W<sub>r</sub> m%s), turns the scores into probabilities P with a softmax, and ",
            E, rc->drn ? ", standardised over the experts and scaled by the layer's learned θ: DRN" : "");
    if (topp) {
        fputs("takes experts in order of P while the sum of the probabilities taken before is below p: "
              "|S| is how many it took. A confident router (one large P) passes p with one expert; a hesitant one "
              "needs several. ", f);
    } else {
        fprintf(f, "takes the %d most probable: every token gets the same number. ", rc->k);
    }
    fputs("The surprise of a token is −log P(token | the text before it in its window), what the model "
          "paid to predict it; the loss at a position is the surprise of the next token. "
          "Numbers are from one forward pass with the model's threshold, as in evaluation "
          "(no controller step).</p>\n", f);

    fputs("<script type=\"application/json\" id=\"data\">{", f);
    fputs("\"model\":", f);
    json_string(f, (const unsigned char *)model_path, strlen(model_path));
    fputs(",\"text\":", f);
    json_string(f, (const unsigned char *)text_path, strlen(text_path));
    fprintf(f, ",\"L\":%d,\"E\":%d,\"topp\":%d,\"drn\":%d,\"k\":%d,\"window\":%d,\"windows\":%d,\"budget\":",
            L, E, topp,
            rc->drn, rc->k, x->window, x->windows);
    json_string(f, (const unsigned char *)budget, strlen(budget));
    fputs(",\"p\":", f);
    json_floats(f, model->threshold, L, 4);
    float *theta = (float *)malloc_check(L * sizeof(float));
    model_get_theta(model, theta);
    fputs(",\"theta\":", f);
    json_floats(f, theta, L, 4);
    free(theta);
    fputs(",\n\"tokens\":[", f);
    for (int i = 0; i < x->n; i++) {
        unsigned char byte;
        size_t len;
        const unsigned char *bytes = explain_token_bytes(codec, x->tokens[i], &byte, &len);
        if (i > 0) { fputc(',', f); }
        json_string(f, bytes, len);
    }
    fputs("],\n\"S\":[", f);
    for (int l = 0; l < L; l++) {
        if (l > 0) { fputc(',', f); }
        json_ints(f, x->n_selected + (size_t)l * N, N);
    }
    size_t LNE = (size_t)L * N * E;
    fputs("],\n\"loss\":", f);
    json_floats(f, x->loss, N, 5);
    fputs(",\n\"order\":", f);
    json_ints(f, x->order, LNE);
    fputs(",\n\"P\":", f);
    json_floats(f, x->probs, LNE, 4);
    fputs(",\n\"z\":", f);
    json_floats(f, x->logits, LNE, 3);
    fputs(",\n\"cum\":", f);
    json_floats(f, x->cum, LNE, 4);
    fputs("}</script>\n<script>\n" HTML_SHADE_JS, f);
    fputs(explain_js, f);
    fputs("document.getElementById('model').textContent=D.model;\n"
          "document.getElementById('textfile').textContent=D.text;\n"
          "</script>\n", f);
    html_end(f);
    finish_atomic_write(f, tmp, path);
}

// The terminal's view: the text with a background colour per token by its mean |S| over the layers.
static void explain_print_ansi(const Explanation *x, const Model *model, const TextCodec *codec,
                               const char *model_path, const char *text_path) {
    const RouterConfig *rc = &model->router;
    int L = x->L, E = x->E, N = x->N;
    char budget[128];
    printf("%s through %s: %d tokens, %d routed positions", text_path, model_path, x->n, N);
    if (x->windows > 1) {
        printf(" in %d windows of at most %d (each its own forward pass; ¦ marks a start)", x->windows, x->window);
    }
    printf("\nrouting %s, budget %s", routing_names[rc->routing], explain_budget(rc, budget, sizeof(budget)));
    if (rc->routing != ROUTING_TOPK) { printf(", p %.3f", model->threshold[0]); }
    printf("; mean loss %.4f nats per token\nactivated experts, mean over the %d layers: ", explain_mean_loss(x), L);
    for (int s = 1; s <= E; s++) { printf("%s %d \033[0m", shade_ansi(E > 1 ? (s - 1.0) / (E - 1) : 0), s); }
    printf("%s\n\n", codec->byte_level ? "" : "  (every other token underlined)");
    const char *current = "";  // the escape in effect: a new one only where the colour changes
    for (int i = 0; i < x->n; i++) {
        if (i > 0 && i < N && i % x->window == 0) {
            printf("\033[0m\033[1m¦\033[0m");
            current = "";
        }
        double mean = 0.0;
        for (int l = 0; i < N && l < L; l++) { mean += x->n_selected[(size_t)l * N + i]; }
        const char *colour = i < N ? shade_ansi(E > 1 ? (mean / L - 1.0) / (E - 1) : 0) : "\033[2m";
        if (colour != current || !codec->byte_level) { printf("\033[0m%s", colour); }
        current = colour;
        if (!codec->byte_level && i % 2 == 1) { fputs("\033[4m", stdout); }
        unsigned char byte;
        size_t len;
        const unsigned char *bytes = explain_token_bytes(codec, x->tokens[i], &byte, &len);
        int newline = 0;
        for (size_t k = 0; k < len;) {
            int m = utf8_sequence_length(bytes + k, len - k);
            if (m == 0) { printf("\u27E8%02x\u27E9", bytes[k]); m = 1; }
            else if (bytes[k] == '\n') { fputs("↵", stdout); newline = 1; }
            else if (bytes[k] == '\t') { fputs("→", stdout); }
            else if (m == 1 && (bytes[k] < 0x20 || bytes[k] == 0x7F)) { printf("\u27E8%02x\u27E9", bytes[k]); }
            else { fwrite(bytes + k, 1, m, stdout); }
            k += m;
        }
        if (newline) {
            printf("\033[0m\n");
            current = "";
        }
    }
    printf("\033[0m\n\n  layer  %s mean |S|   σ      |S| = 1 .. %d\n", rc->routing != ROUTING_TOPK ? "    p " : "", E);
    static const char *bars[] = {" ", "▁", "▂", "▃", "▄", "▅", "▆", "▇", "█"};
    int *hist = (int *)malloc_check((size_t)(E + 1) * sizeof(int));
    for (int l = 0; l < L; l++) {
        double sum = 0.0, sq = 0.0;
        memset(hist, 0, (size_t)(E + 1) * sizeof(int));
        for (int i = 0; i < N; i++) {
            int s = x->n_selected[(size_t)l * N + i];
            hist[s]++;
            sum += s;
            sq += (double)s * s;
        }
        double mean = sum / N, sd = sqrt(fmax(0.0, sq / N - mean * mean));
        printf("  %5d  ", l);
        if (rc->routing != ROUTING_TOPK) { printf("%.3f  ", model->threshold[l]); }
        printf("%6.2f   %-5.2f  ", mean, sd);
        for (int s = 1; s <= E; s++) { fputs(bars[(int)ceil((double)hist[s] / N * 8)], stdout); }
        printf("\n");
    }
    free(hist);
    printf("(for a token's experts, probabilities and the sum against p: --html PAGE.html)\n");
}

// --init MODEL --explain TEXT: loads the model and the text, checks them, runs the forward pass
// and shows it (a page with --html, else the terminal).
static int explain_from_checkpoint(const Options *o) {
    Model model;
    model_load(&model, o->init_path);
    const ModelConfig *c = &model.config;
    TextCodec codec;
    codec_init(&codec, o->tokenizer_path, c);
    FILE *f = fopen_check(o->explain, "rb");
    long size = file_size(f, o->explain);
    if (size == 0) { fail("%s is empty: there is no text to explain", o->explain); }
    char *text = (char *)malloc_check((size_t)size + 1);
    fread_check(text, 1, (size_t)size, f, o->explain);
    fclose(f);
    text[size] = '\0';
    Explanation x;
    memset(&x, 0, sizeof(x));
    size_t n = (size_t)size;
    if (codec.byte_level) {  // every byte, NUL included
        x.tokens = (int *)malloc_check(n * sizeof(int));
        for (size_t i = 0; i < n; i++) { x.tokens[i] = (unsigned char)text[i]; }
    } else {
        x.tokens = tokenizer_encode(&codec.tokenizer, text, n, &n);
    }
    for (size_t i = 0; i < n; i++) {
        if (x.tokens[i] < 0 || x.tokens[i] >= c->vocab_size) {
            if (codec.byte_level) {
                fail("%s: byte %zu (0x%02X) is token %d, outside the vocabulary of %s (%d tokens)", o->explain, i,
                     (unsigned)x.tokens[i], x.tokens[i], o->init_path, c->vocab_size);
            }
            fail("%s: token %zu is %d, outside the vocabulary of %s (%d tokens)", o->explain, i, x.tokens[i],
                 o->init_path, c->vocab_size);
        }
    }
    if (n < 2) {
        fail("%s is %zu token long: --explain needs at least 2 (a token is routed with the next as its target)",
             o->explain, n);
    }
    if (n - 1 > (size_t)MAX_SIZE) { fail("%s: %zu tokens, more than --explain takes (%d)", o->explain, n, MAX_SIZE); }
    if (o->explain_window > c->max_seq_len) {
        fail("--explain-window %d is longer than the longest sequence of %s (%d tokens)", o->explain_window,
             o->init_path, c->max_seq_len);
    }
    x.n = (int)n;
    x.N = x.n - 1;
    x.window = o->explain_window > 0 ? o->explain_window : c->max_seq_len;
    FILE *dump = NULL;
    if (o->routing_dump != NULL && (dump = fopen(o->routing_dump, "w")) == NULL) {
        fail("cannot write %s: %s", o->routing_dump, strerror(errno));
    }
    explain_forward(&model, &x, dump);
    if (dump != NULL && fclose(dump) != 0) { fail("cannot write %s: %s", o->routing_dump, strerror(errno)); }
    if (o->html != NULL) {
        explain_write_html(&x, &model, &codec, o->init_path, o->explain, o->html);
        printf("wrote %s: %d tokens of %s, %d routed positions in %d window%s of at most %d\n", o->html, x.n,
               o->explain, x.N, x.windows, x.windows > 1 ? "s" : "", x.window);
    } else {
        explain_print_ansi(&x, &model, &codec, o->init_path, o->explain);
    }
    free(text);
    free(x.tokens);
    free(x.n_selected);
    free(x.order);
    free(x.probs);
    free(x.logits);
    free(x.cum);
    free(x.loss);
    if (codec.loaded) { tokenizer_free(&codec.tokenizer); }
    model_free(&model);
    return EXIT_SUCCESS;
}

#endif  // EXPLAIN_H
