/*
html.h: what the routing pages share (train_dtopp --explain, dtopp/explain.h; eval_dit explain,
dit/explain_dit.h): one self-contained HTML file, with its style, its script and its data inline,
so it opens from disk with no network and no library. The C side writes the data as JSON into a
<script type="application/json"> element and the page's script draws everything from it.

- html_begin / html_end: the page's head with the shared style, and its end.
- json_string, json_ints, json_floats: JSON values, safe inside a <script> element (no "</").
- HTML_SHADE_JS: the colour scale of both pages (yellow, orange, red, dark red: few to many
  experts), as a JavaScript function; shade_ansi is the same scale on a 256-colour terminal.
*/
#ifndef HTML_H
#define HTML_H

#include <stdio.h>
#include <string.h>

// The length of the UTF-8 sequence that starts s[0] (at most n bytes), or 0 if it is not a valid one.
static int utf8_sequence_length(const unsigned char *s, size_t n) {
    int len = s[0] < 0x80 ? 1 : (s[0] & 0xE0) == 0xC0 ? 2 : (s[0] & 0xF0) == 0xE0 ? 3 : (s[0] & 0xF8) == 0xF0 ? 4 : 0;
    if (len == 0 || (size_t)len > n || (len == 2 && s[0] < 0xC2)) { return 0; }
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) { return 0; }
    }
    return len;
}

// A JSON string of the bytes s[0..n): valid UTF-8 is kept, a byte that is not part of a whole
// UTF-8 character (a piece of a character split between tokens) is written as ⟨xx⟩, its value in
// hex; '<' is escaped so that the string cannot close the <script> element holding it.
static void json_string(FILE *f, const unsigned char *s, size_t n) {
    fputc('"', f);
    for (size_t i = 0; i < n;) {
        int len = utf8_sequence_length(s + i, n - i);
        if (len == 0) {
            fprintf(f, "\u27E8%02x\u27E9", s[i]);
            i++;
        } else if (len > 1) {
            fwrite(s + i, 1, len, f);
            i += len;
        } else {
            unsigned char ch = s[i++];
            if (ch == '"' || ch == '\\') { fprintf(f, "\\%c", ch); }
            else if (ch == '\n') { fputs("\\n", f); }
            else if (ch == '\t') { fputs("\\t", f); }
            else if (ch < 0x20 || ch == '<' || ch == '>' || ch == '&' || ch == 0x7F) { fprintf(f, "\\u%04x", ch); }
            else { fputc(ch, f); }
        }
    }
    fputc('"', f);
}

static void json_ints(FILE *f, const int *v, size_t n) {
    fputc('[', f);
    for (size_t i = 0; i < n; i++) { fprintf(f, i ? ",%d" : "%d", v[i]); }
    fputc(']', f);
}

// Floats with `decimals` digits after the point (trailing zeros dropped, to keep the page small).
static void json_floats(FILE *f, const float *v, size_t n, int decimals) {
    fputc('[', f);
    for (size_t i = 0; i < n; i++) {
        char text[64];
        snprintf(text, sizeof(text), "%.*f", decimals, isfinite(v[i]) ? v[i] : 0.0f);
        if (strchr(text, '.') != NULL) {
            char *end = text + strlen(text) - 1;
            while (*end == '0') { *end-- = '\0'; }
            if (*end == '.') { *end = '\0'; }
        }
        if (strcmp(text, "-0") == 0) { strcpy(text, "0"); }
        fprintf(f, i ? ",%s" : "%s", text);
    }
    fputc(']', f);
}

// The colour scale: t in [0, 1] from few experts (pale yellow) to many (dark red); dark text on
// the light end.
#define HTML_SHADE_JS                                                                                      \
    "const STOPS=[[255,255,204],[255,237,160],[254,217,118],[254,178,76],[253,141,60],[252,78,42],"     \
    "[227,26,28],[189,0,38],[128,0,38]];\n"                                                              \
    "function shade(t){t=Math.max(0,Math.min(1,isFinite(t)?t:0))*(STOPS.length-1);"                    \
    "const i=Math.min(Math.floor(t),STOPS.length-2),f=t-i,a=STOPS[i],b=STOPS[i+1];"                     \
    "return 'rgb('+a.map((x,k)=>Math.round(x+(b[k]-x)*f)).join(',')+')';}\n"                           \
    "function ink(t){return t>0.55?'#fff':'#111';}\n"

// The same scale on a 256-colour terminal: a background colour escape for t in [0, 1].
static inline const char *shade_ansi(double t) {
    static const char *codes[] = {"\033[48;5;230;38;5;16m", "\033[48;5;229;38;5;16m", "\033[48;5;222;38;5;16m",
                                  "\033[48;5;215;38;5;16m", "\033[48;5;209;38;5;16m", "\033[48;5;203;38;5;231m",
                                  "\033[48;5;160;38;5;231m", "\033[48;5;124;38;5;231m", "\033[48;5;88;38;5;231m"};
    int i = (int)lround((t < 0 ? 0 : t > 1 ? 1 : t) * 8);
    return codes[i];
}

// The head of a page: its title (escaped) and the style both pages use.
static void html_begin(FILE *f, const char *title) {
    fputs("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>", f);
    for (const char *c = title; *c; c++) {
        if (*c == '<') { fputs("&lt;", f); }
        else if (*c == '&') { fputs("&amp;", f); }
        else { fputc(*c, f); }
    }
    fputs("</title>\n<style>\n"
          "body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:16px 20px;color:#111;"
          "background:#fff;max-width:1500px}\n"
          "h1{font-size:19px;margin:0 0 4px}h2{font-size:15px;margin:18px 0 6px}\n"
          ".meta{color:#444;margin:2px 0}.note{color:#7a4b00;background:#fff4dc;padding:4px 8px;"
          "border-radius:4px;display:inline-block;margin:4px 0}\n"
          ".controls{margin:10px 0;display:flex;gap:14px;align-items:center;flex-wrap:wrap}\n"
          ".legend span{display:inline-block;min-width:22px;text-align:center;padding:1px 3px;margin-right:1px;"
          "border:1px solid #ccc;font:12px monospace}\n"
          "table{border-collapse:collapse;font:12px monospace}td,th{padding:2px 6px;border-bottom:1px solid #eee;"
          "text-align:right;white-space:nowrap}th{background:#f4f4f4}\n"
          ".bar{display:inline-block;vertical-align:bottom;width:9px;background:#d95f0e;margin-right:1px}\n"
          ".hint{color:#666;font-size:12px}\n"
          "</style></head><body>\n", f);
}

static void html_end(FILE *f) { fputs("</body></html>\n", f); }

#endif  // HTML_H
