/*
make_offline_text: writes the project's own training text, for machines without a network.

    make_offline_text [BYTES] > input.txt        (default about 800000 bytes)

Short stories about the people of one village, from a small random grammar. The output depends
only on BYTES: the random generator is our own, with a fixed seed, so every machine makes the same
file. The text is meant to be learnable by a tiny model at several levels:
  - spelling and grammar: a few hundred words in a few dozen sentence patterns;
  - facts: every person always has the same trade, workplace, tool and favourite thing, so
    "Tom the ..." is always "fisherman";
  - structure: every story has a title, a numbered day that follows the previous story's day of
    the week, a dialogue in "Name: ..." lines, and an ending that mentions the same people;
  - counting: number words go up one by one and agree with the count given before them.
*/
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char *name, *trade, *place, *tool, *likes, *he, *his;
} Person;

static const Person cast[] = {
    {"Anna", "baker", "the bakery", "rolling pin", "honey cakes", "she", "her"},
    {"Tom", "fisherman", "the harbour", "net", "hot soup", "he", "his"},
    {"Mira", "teacher", "the school", "chalk", "old books", "she", "her"},
    {"Ben", "farmer", "the farm", "plough", "red apples", "he", "his"},
    {"Lena", "doctor", "the clinic", "bag", "green tea", "she", "her"},
    {"Sam", "smith", "the forge", "hammer", "strong coffee", "he", "his"},
    {"Rosa", "painter", "the studio", "brush", "bright ribbons", "she", "her"},
    {"Otto", "miller", "the mill", "sack", "sweet plums", "he", "his"},
};
#define NCAST ((int)(sizeof cast / sizeof cast[0]))

static const char *days[] = {"Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"};
static const char *numbers[] = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"};
static const char *weather[] = {"sunny", "rainy", "windy", "cold", "foggy", "warm"};
static const char *hiding[] = {"under a table", "behind the door", "next to the well", "in a basket", "on a high shelf",
                               "under the old bridge"};
static const char *feelings[] = {"happy", "glad", "relieved", "surprised", "thankful"};
static const char *things[] = {"eggs", "fish", "apples", "books", "nails", "pots", "loaves", "stones"};

static unsigned long long rng_state = 20240520ULL;
static int pick(int n) {  // xorshift64*: the same numbers on every machine, unlike rand()
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (int)(((rng_state * 2685821657736338717ULL) >> 33) % (unsigned long long)n);
}
#define ANY(array) array[pick((int)(sizeof array / sizeof array[0]))]

static size_t written;  // bytes so far
static void out(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    if (n > 0) written += (size_t)n;
}

// first letter upper case, for a sentence that starts with a pronoun
static const char *cap(const char *he) { return strcmp(he, "she") == 0 ? "She" : "He"; }

static void story(int number, int day) {
    int a = pick(NCAST), b = pick(NCAST - 1), c = pick(NCAST - 2);
    if (b >= a) b++;  // three different people
    while (c == a || c == b) c = (c + 1) % NCAST;
    const Person *p = &cast[a], *q = &cast[b], *r = &cast[c];
    int kind = pick(3);
    out("Story %d: %s and the %s\n\n", number, p->name, kind == 0 ? p->tool : kind == 1 ? "storm" : things[number % 8]);
    out("It was a %s %s in the village. %s the %s went to %s, as %s did every morning.\n", ANY(weather), days[day],
        p->name, p->trade, p->place, p->he);
    if (kind == 0) {  // something is lost and found
        const char *where = ANY(hiding);
        out("But when %s got there, %s %s was gone.\n\n", p->name, p->his, p->tool);
        out("%s: Good morning, %s! Have you seen my %s?\n", p->name, q->name, p->tool);
        if (pick(2)) {
            out("%s: Good morning, %s. No, I have not. Ask %s, the %s.\n", q->name, p->name, r->name, r->trade);
            out("%s: Thank you, %s.\n", p->name, q->name);
            out("%s: %s? Yes, I saw your %s %s at %s.\n\n", r->name, p->name, p->tool, where, r->place);
            q = r;
        } else {
            out("%s: Good morning, %s. Yes, I saw your %s %s at %s.\n\n", q->name, p->name, p->tool, where, q->place);
        }
        out("So %s went to %s and found the %s %s. %s was very %s.\n", p->name, q->place, p->tool, where, p->name,
            ANY(feelings));
        out("To say thank you, %s gave %s some %s, because %s likes %s.\n\n", p->name, q->name, p->likes, q->name, q->likes);
    } else if (kind == 1) {  // a storm, and people help each other
        out("In the afternoon the sky grew dark and a great storm came over the hills.\n\n");
        out("%s: %s, the wind is too strong! Can you help me at %s?\n", p->name, q->name, p->place);
        out("%s: Of course, %s. I will bring my %s.\n", q->name, p->name, q->tool);
        out("%s: Thank you! And I will ask %s the %s to come too.\n\n", p->name, r->name, r->trade);
        out("Together %s, %s and %s worked until the storm was over. Nothing at %s was lost.\n", p->name, q->name, r->name, p->place);
        out("%s said: Without my friends I could not have done it. %s likes %s, and %s likes %s.\n\n", p->name, q->name,
            q->likes, r->name, r->likes);
    } else {  // counting things for the market
        int n = 2 + pick(8);
        const char *thing = things[number % 8];
        out("%s had to bring %s %s to the market.\n\n", p->name, numbers[n - 1], thing);
        out("%s: %s, will you help me count the %s?\n", p->name, q->name, thing);
        out("%s: Yes. Let us count them together.\n", q->name);
        out("%s: %c%s", q->name, toupper((unsigned char)numbers[0][0]), numbers[0] + 1);
        for (int i = 1; i < n; i++) out(", %s", numbers[i]);
        out(".\n");
        out("%s: So that is %s %s. Thank you, %s the %s.\n\n", p->name, numbers[n - 1], thing, q->name, q->trade);
        out("At the market %s sold the %s %s, and %s bought some %s for %s.\n\n", p->name, numbers[n - 1], thing, p->he,
            q->likes, q->name);
    }
    out("%s went home to %s in the evening. %s was tired but %s.\n", p->name, p->place, cap(p->he), ANY(feelings));
    out("The next day was %s.\n\n", days[(day + 1) % 7]);
}

int main(int argc, char **argv) {
    long target = 800000;
    if (argc > 2 || (argc == 2 && (target = strtol(argv[1], NULL, 10)) <= 0)) {
        fprintf(stderr, "usage: %s [BYTES] > input.txt\n", argv[0]);
        return 1;
    }
    out("The Village Stories\n\n");
    out("In our village there are %d people. ", NCAST);
    for (int i = 0; i < NCAST; i++)
        out("%s is the %s and works at %s with %s %s.%s", cast[i].name, cast[i].trade, cast[i].place, cast[i].his, cast[i].tool,
            i + 1 < NCAST ? " " : "\n\n");
    for (int n = 1, day = 0; written < (size_t)target; n++, day = (day + 1) % 7) story(n, day);
    return 0;
}
