/* Greedy longest-match byte trie for the RWKV World tokenizer.
 *
 * Same semantics as rwkv.rwkv_tokenizer.TRIE_TOKENIZER: from the current position, walk
 * the trie as far as the input allows and emit the deepest node that ends a token.
 *
 * The trie is a double array: the child of cell s by byte c is cell base[s] + c if that
 * cell's check equals s. One memory access per input byte, a few MB for the 65k vocab.
 * It is built from a first-child / next-sibling trie by placing each node's children at
 * the first base where they all fit. Built by rwkv_peft/data/tokenizer.py with the system
 * C compiler, loaded with ctypes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int32_t base;  /* children of this cell are at base + byte */
    int32_t check; /* parent cell, -1 if the cell is free */
    int32_t value; /* token id ending here, -1 if none */
} Cell;

typedef struct {
    Cell *cells;
    int64_t size;
} Trie;

typedef struct {     /* the plain trie used while building */
    int32_t *first;  /* first child, -1 if none */
    int32_t *next;   /* next sibling, -1 if none */
    uint8_t *byte;   /* byte leading to this node */
    int32_t *value;  /* token id ending here, -1 if none */
    int32_t n;
} Plain;

void trie_free(Trie *t)
{
    if (!t)
        return;
    free(t->cells);
    free(t);
}

static int plain_build(Plain *p, const uint8_t *data, const int64_t *offsets,
                       const int32_t *ids, int64_t n_tokens)
{
    int64_t cap = offsets[n_tokens] + 1; /* at most one node per token byte, plus root */
    p->first = malloc(sizeof(int32_t) * cap);
    p->next = malloc(sizeof(int32_t) * cap);
    p->byte = malloc(cap);
    p->value = malloc(sizeof(int32_t) * cap);
    if (!p->first || !p->next || !p->byte || !p->value)
        return -1;
    p->first[0] = p->next[0] = p->value[0] = -1;
    p->n = 1;
    int32_t root_child[256]; /* the root has up to 256 children: index them directly */
    for (int c = 0; c < 256; c++)
        root_child[c] = -1;
    for (int64_t i = 0; i < n_tokens; i++) {
        int32_t node = 0;
        for (int64_t j = offsets[i]; j < offsets[i + 1]; j++) {
            uint8_t c = data[j];
            int32_t child = node ? p->first[node] : root_child[c];
            if (node)
                while (child >= 0 && p->byte[child] != c)
                    child = p->next[child];
            if (child < 0) {
                child = p->n++;
                p->first[child] = p->value[child] = -1;
                p->byte[child] = c;
                p->next[child] = p->first[node];
                p->first[node] = child;
                if (!node)
                    root_child[c] = child;
            }
            node = child;
        }
        p->value[node] = ids[i]; /* a repeated token keeps the last id, as rwkv does */
    }
    return 0;
}

static int grow(Trie *t, int64_t need)
{
    if (need <= t->size)
        return 0;
    int64_t size = t->size * 2 > need ? t->size * 2 : need;
    Cell *cells = realloc(t->cells, sizeof(Cell) * size);
    if (!cells)
        return -1;
    for (int64_t s = t->size; s < size; s++)
        cells[s] = (Cell){0, -1, -1};
    t->cells = cells;
    t->size = size;
    return 0;
}

/* data: all token bytes back to back; token i is data[offsets[i] .. offsets[i+1]). */
Trie *trie_build(const uint8_t *data, const int64_t *offsets, const int32_t *ids, int64_t n)
{
    Plain p = {0};
    Trie *t = calloc(1, sizeof(Trie));
    int32_t *queue = NULL, *cell_of = NULL;
    int ok = t && plain_build(&p, data, offsets, ids, n) == 0;
    if (ok) {
        queue = malloc(sizeof(int32_t) * p.n);   /* nodes in breadth-first order */
        cell_of = malloc(sizeof(int32_t) * p.n); /* node -> its cell */
        ok = queue && cell_of && grow(t, 2 * (int64_t)p.n + 512) == 0;
    }
    if (ok) {
        t->cells[0] = (Cell){0, -2, -1}; /* root; -2 is nobody's parent */
        cell_of[0] = 0;
        queue[0] = 0;
        int64_t head = 0, tail = 1, first_free = 1;
        while (ok && head < tail) {
            int32_t node = queue[head++], s = cell_of[node];
            t->cells[s].value = p.value[node];
            if (p.first[node] < 0)
                continue;
            int lo = 255;
            for (int32_t c = p.first[node]; c >= 0; c = p.next[c])
                lo = p.byte[c] < lo ? p.byte[c] : lo;
            while (t->cells[first_free].check != -1)
                first_free++;
            /* first base >= 0 where every child's cell is free (cell 0 is the root) */
            for (int64_t b = first_free > lo ? first_free - lo : 0;; b++) {
                if (grow(t, b + 257) != 0) {
                    ok = 0;
                    break;
                }
                int32_t c = p.first[node];
                while (c >= 0 && b + p.byte[c] >= 1 && t->cells[b + p.byte[c]].check == -1)
                    c = p.next[c];
                if (c >= 0)
                    continue;
                t->cells[s].base = (int32_t)b;
                for (c = p.first[node]; c >= 0; c = p.next[c]) {
                    t->cells[b + p.byte[c]].check = s;
                    cell_of[c] = (int32_t)(b + p.byte[c]);
                    queue[tail++] = c;
                }
                break;
            }
        }
    }
    free(p.first);
    free(p.next);
    free(p.byte);
    free(p.value);
    free(queue);
    free(cell_of);
    if (!ok) {
        trie_free(t);
        return NULL;
    }
    return t;
}

/* Writes at most n ids to out. Returns their count, or -(pos + 1) if no token matches
 * at byte pos (impossible when every single byte is in the vocab). */
int64_t trie_encode(const Trie *t, const uint8_t *src, int64_t n, int32_t *out)
{
    const Cell *cells = t->cells;
    int64_t i = 0, k = 0;
    while (i < n) {
        int32_t s = 0, best = -1;
        int64_t best_end = i;
        for (int64_t j = i; j < n; j++) {
            int32_t next = cells[s].base + src[j]; /* < size: grow() keeps base + 256 */
            if (cells[next].check != s)
                break;
            s = next;
            if (cells[s].value >= 0) {
                best = cells[s].value;
                best_end = j + 1;
            }
        }
        if (best < 0)
            return -(i + 1);
        out[k++] = best;
        i = best_end;
    }
    return k;
}

/* Encodes n_docs documents, document d being src[offsets[d] .. offsets[d+1]), into out
 * back to back, each followed by eod unless eod < 0; counts[d] gets its length (eod
 * included). out needs offsets[n_docs] + n_docs slots. Returns the total, or -(pos + 1). */
int64_t trie_encode_docs(const Trie *t, const uint8_t *src, const int64_t *offsets,
                         int64_t n_docs, int32_t eod, int32_t *out, int64_t *counts)
{
    int64_t total = 0;
    for (int64_t d = 0; d < n_docs; d++) {
        int64_t k = trie_encode(t, src + offsets[d], offsets[d + 1] - offsets[d], out + total);
        if (k < 0)
            return k - offsets[d];
        if (eod >= 0)
            out[total + k++] = eod;
        counts[d] = k;
        total += k;
    }
    return total;
}
