/*
dit/explain_dit.h: eval_dit explain, the DiT's routing made visible (doc/dit.md).

  eval_dit explain --model FILE --out PAGE.html

writes one self-contained page (dtopp/html.h): the first test image of every class, noised to ten
levels t = 0.05 .. 0.95 as in training (x_t = (1 - t) x_0 + t ε, one ε for every level), one row
per level; each image is the input x_t the model saw (or the clean image, or none) under its 4 x 4
patches shaded by the number of experts each patch activated, in a layer the reader picks or
averaged over the layers. Hovering a patch gives its |S| in every layer; the summary gives the
mean |S| of each layer at each level. The numbers come from one forward pass per level with the
model's threshold, as `eval_dit routing` measures them.
*/
#ifndef EXPLAIN_DIT_H
#define EXPLAIN_DIT_H

#include "../dtopp/html.h"  // defines: html_begin, html_end, json_*, HTML_SHADE_JS

#define EXPLAIN_DIT_LEVELS 10

static const char explain_dit_js[] =
    "const D=JSON.parse(document.getElementById('data').textContent);\n"
    "const L=D.L,E=D.E,K=D.classes.length,R=D.t.length,S=D.S,G=D.grid,T=G*G,$=id=>document.getElementById(id),fmt=(x,"
    "d)=>Number(x).toFixed(d);\n"
    "const Z=4,cells=[];\n"
    "function sel(r,k,l,n){return D.sel[((r*K+k)*L+l)*T+n];}\n"
    "function val(r,k,n,mode){if(mode!=='mean')return sel(r,k,+mode,n);let s=0;for(let l=0;l<L;l++)s+=sel(r,k,l,n);re"
    "turn s/L;}\n"
    "let h='<tr><th>t</th>';for(let k=0;k<K;k++)h+='<th>'+D.classes[k]+'</th>';h+='<th>mean |S|</th></tr>';\n"
    "for(let r=0;r<R;r++){h+='<tr><th>'+fmt(D.t[r],2)+'</th>';\n"
    "  for(let k=0;k<K;k++)h+='<td><canvas class=\"cell\" width=\"'+S*Z+'\" height=\"'+S*Z+'\" data-r=\"'+r+'\" data-"
    "k=\"'+k+'\"></canvas></td>';\n"
    "  h+='<td class=\"rowmean\" id=\"row-'+r+'\"></td></tr>';}\n"
    "$('grid').innerHTML=h;\n"
    "document.querySelectorAll('canvas.cell').forEach(c=>cells.push(c));\n"
    "function draw(){\n"
    "  const mode=$('shade').value,img=$('image').value,alpha=+$('alpha').value/100;\n"
    "  for(const c of cells){const r=+c.dataset.r,k=+c.dataset.k,ctx=c.getContext('2d');\n"
    "    const px=img==='clean'?D.clean[k]:D.xt[r*K+k];\n"
    "    for(let y=0;y<S;y++)for(let x=0;x<S;x++){const v=img==='none'?255:px[y*S+x];ctx.fillStyle='rgb('+v+','+v+','"
    "+v+')';ctx.fillRect(x*Z,y*Z,Z,Z);}\n"
    "    ctx.globalAlpha=alpha;const P=S/G;\n"
    "    for(let n=0;n<T;n++){const v=val(r,k,n,mode);ctx.fillStyle=shade((v-1)/Math.max(E-1,1));\n"
    "      ctx.fillRect((n%G)*P*Z,Math.floor(n/G)*P*Z,P*Z,P*Z);}\n"
    "    ctx.globalAlpha=1;}\n"
    "  for(let r=0;r<R;r++){let s=0;for(let k=0;k<K;k++)for(let n=0;n<T;n++)s+=val(r,k,n,mode);$('row-'+r).textConten"
    "t=fmt(s/(K*T),2);}\n"
    "  let lg='';for(let s=1;s<=E;s++){const t=(s-1)/Math.max(E-1,1);lg+='<span style=\"background:'+shade(t)+';color"
    ":'+ink(t)+'\">'+s+'</span>';}\n"
    "  $('legend').innerHTML=(mode==='mean'?'activated experts, mean over the '+L+' layers: ':'activated experts in l"
    "ayer '+mode+': ')+lg;\n"
    "}\n"
    "$('grid').addEventListener('mousemove',e=>{const c=e.target;if(!c.dataset||c.dataset.r===undefined)return;\n"
    "  const r=+c.dataset.r,k=+c.dataset.k,P=S/G,n=Math.floor(e.offsetY/Z/P)*G+Math.floor(e.offsetX/Z/P);\n"
    "  if(n<0||n>=T)return;let s='';for(let l=0;l<L;l++)s+=(l?', ':'')+sel(r,k,l,n);\n"
    "  $('details').innerHTML=D.classes[k]+', t = '+fmt(D.t[r],2)+', patch '+n+' (row '+Math.floor(n/G)+', column '+("
    "n%G)+\n"
    "    '): |S| by layer = <b>'+s+'</b>, mean <b>'+fmt(val(r,k,n,'mean'),2)+'</b>';});\n"
    "['shade','image','alpha'].forEach(id=>$(id).addEventListener('input',draw));\n"
    "let sum='<tr><th>layer</th>';for(let r=0;r<R;r++)sum+='<th>t = '+fmt(D.t[r],2)+'</th>';sum+='</tr>';\n"
    "for(let l=0;l<L;l++){sum+='<tr id=\"sum-'+l+'\"><td>'+l+'</td>';\n"
    "  for(let r=0;r<R;r++){let s=0;for(let k=0;k<K;k++)for(let n=0;n<T;n++)s+=sel(r,k,l,n);sum+='<td>'+fmt(s/(K*T),2"
    ")+'</td>';}sum+='</tr>';}\n"
    "$('summary').innerHTML=sum;\n"
    "const q=new URLSearchParams(location.hash.slice(1));if(q.has('shade'))$('shade').value=q.get('shade');\n"
    "draw();\n";

static void explain_dit(const char *model_path, const char *data_dir, const char *out_path) {
    Dit gen;
    dit_load(&gen, model_path);
    const ModelConfig *c = &gen.trunk.config;
    int L = c->num_layers, T = c->max_seq_len, K = gen.config.num_classes, S = gen.config.image_size;
    Batches s;
    batches_open(&s, data_dir, S, 1, 1);
    int D = S * S, *first = (int *)malloc_check(K * sizeof(int)), found = 0;
    for (int k = 0; k < K; k++) { first[k] = -1; }
    for (int i = 0; i < s.val_images.count && found < K; i++) {  // the first test image of every class
        int k = s.val_labels.data[i];
        if (k < K && first[k] < 0) { first[k] = i, found++; }
    }
    if (found < K) { fail("%s: the test set lacks an image of %d of the %d classes", data_dir, K - found, K); }
    size_t images = (size_t)K * D * sizeof(float);
    float *x0 = (float *)malloc_check(images), *noise = (float *)malloc_check(images);
    float *xt = (float *)malloc_check(images), *velocity = (float *)malloc_check(images);
    float *t = (float *)malloc_check(K * sizeof(float)), times[EXPLAIN_DIT_LEVELS];
    int *classes = (int *)malloc_check(K * sizeof(int));
    int *selected = (int *)malloc_check((size_t)EXPLAIN_DIT_LEVELS * K * L * T * sizeof(int));
    int *counts = (int *)malloc_check((size_t)L * K * T * sizeof(int));
    int *pixels = (int *)malloc_check((size_t)EXPLAIN_DIT_LEVELS * K * D * sizeof(int));
    uint64_t rng = 1;
    for (int k = 0; k < K; k++) {
        to_unit_range(x0 + (size_t)k * D, s.val_images.data + (size_t)first[k] * D, D);
        classes[k] = k;
    }
    for (size_t i = 0; i < (size_t)K * D; i++) { noise[i] = random_normal(&rng); }
    for (int r = 0; r < EXPLAIN_DIT_LEVELS; r++) {
        times[r] = (r + 0.5f) / EXPLAIN_DIT_LEVELS;
        for (int k = 0; k < K; k++) { t[k] = times[r]; }
        rectified_flow_pair(xt, velocity, x0, noise, t, K, D);
        dit_forward(&gen, xt, t, classes, NULL, K);
        model_routing_counts(&gen.trunk, counts, NULL);  // (L, K·T)
        for (int k = 0; k < K; k++) {
            for (int l = 0; l < L; l++) {
                memcpy(selected + (((size_t)r * K + k) * L + l) * T, counts + ((size_t)l * K + k) * T, T * sizeof(int));
            }
        }
        for (size_t i = 0; i < (size_t)K * D; i++) {
            float v = (xt[i] + 1.0f) * 127.5f;
            pixels[(size_t)r * K * D + i] = v < 0 ? 0 : v > 255 ? 255 : (int)lroundf(v);
        }
    }
    char tmp[4096], title[512];
    snprintf(title, sizeof(title), "Routing of the DiT %s", model_path);
    FILE *f = open_for_atomic_write(out_path, tmp, sizeof(tmp));
    html_begin(f, title);
    fputs("<style>canvas.cell{display:block;image-rendering:pixelated;cursor:crosshair}#grid td{padding:2px}"
          "#grid th{font:12px system-ui}.rowmean{font:12px monospace}</style>\n", f);
    fprintf(f, "<h1>How the router of the DiT <code id=\"model\"></code> spends its experts on image patches</h1>\n"
            "<p class=\"meta\" id=\"config\">model: L=%d layers, C=%d, E=%d experts, %d x %d images in %d x %d "
            "patches (%d tokens); routing <b>%s</b>, DRN %s, p = <b>%.3f</b>%s</p>\n", L, c->channels,
            c->num_experts, S, S, gen.config.patch_size, gen.config.patch_size, T,
            routing_names[gen.trunk.router.routing],
            gen.trunk.router.drn ? "on" : "off", gen.trunk.threshold[0],
            gen.trunk.router.routing == ROUTING_DTOPP ? " (the threshold the controller reached in training)" : "");
    fprintf(f, "<p class=\"meta\">The first test image of each class, noised to %d levels t (one row each, the "
            "same noise ε in every row: x<sub>t</sub> = (1 − t) x<sub>0</sub> + t ε), one forward pass per level "
            "with its class label. Each patch is shaded by its activated experts.</p>\n", EXPLAIN_DIT_LEVELS);
    fputs("<div class=\"controls\"><label>shade by <select id=\"shade\"><option value=\"mean\">activated experts, "
          "mean over layers</option>", f);
    for (int l = 0; l < L; l++) { fprintf(f, "<option value=\"%d\">activated experts, layer %d</option>", l, l); }
    fputs("</select></label><label>under it <select id=\"image\"><option value=\"xt\">the input x_t</option>"
          "<option value=\"clean\">the clean image</option><option value=\"none\">nothing</option></select></label>"
          "<label>opacity <input type=\"range\" id=\"alpha\" min=\"0\" max=\"100\" value=\"60\"></label>"
          "<span class=\"legend\" id=\"legend\"></span></div>\n<div id=\"details\" class=\"hint\">Hover over a patch "
          "for its experts in every layer.</div>\n<table id=\"grid\"></table>\n"
          "<h2>Mean activated experts per patch, by layer and noise level</h2><table id=\"summary\"></table>\n", f);
    fputs("<script type=\"application/json\" id=\"data\">{\"model\":", f);
    json_string(f, (const unsigned char *)model_path, strlen(model_path));
    fprintf(f, ",\"L\":%d,\"E\":%d,\"S\":%d,\"grid\":%d,\"classes\":[", L, c->num_experts, S,
            S / gen.config.patch_size);
    for (int k = 0; k < K; k++) {
        const char *name = K == NUM_CLASSES ? fashion_classes[k] : "class";
        if (k > 0) { fputc(',', f); }
        json_string(f, (const unsigned char *)name, strlen(name));
    }
    fputs("],\"t\":", f);
    json_floats(f, times, EXPLAIN_DIT_LEVELS, 2);
    fputs(",\n\"sel\":", f);
    json_ints(f, selected, (size_t)EXPLAIN_DIT_LEVELS * K * L * T);
    fputs(",\n\"clean\":[", f);
    int *row = (int *)malloc_check(D * sizeof(int));
    for (int k = 0; k < K; k++) {
        for (int i = 0; i < D; i++) { row[i] = s.val_images.data[(size_t)first[k] * D + i]; }
        if (k > 0) { fputc(',', f); }
        json_ints(f, row, D);
    }
    fputs("],\n\"xt\":[", f);
    for (int i = 0; i < EXPLAIN_DIT_LEVELS * K; i++) {
        if (i > 0) { fputs(",\n", f); }
        json_ints(f, pixels + (size_t)i * D, D);
    }
    fputs("]}</script>\n<script>\n" HTML_SHADE_JS, f);
    fputs(explain_dit_js, f);
    fputs("document.getElementById('model').textContent=D.model;\n</script>\n", f);
    html_end(f);
    finish_atomic_write(f, tmp, out_path);
    printf("wrote %s: %d test images at %d noise levels, %s routing, p %.3f\n", out_path, K, EXPLAIN_DIT_LEVELS,
           routing_names[gen.trunk.router.routing], gen.trunk.threshold[0]);
    free(row);
    free(first);
    free(x0);
    free(noise);
    free(xt);
    free(velocity);
    free(t);
    free(classes);
    free(selected);
    free(counts);
    free(pixels);
    batches_close(&s);
    dit_free(&gen);
}

#endif  // EXPLAIN_DIT_H
