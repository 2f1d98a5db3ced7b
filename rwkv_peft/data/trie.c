/* Greedy longest-match byte trie for the RWKV World tokenizer.
 *
 * Same semantics as rwkv.rwkv_tokenizer.TRIE_TOKENIZER: from the current position, walk
 * the trie as far as the input allows and emit the deepest node that ends a token.
 * The first two bytes index a dense table (most of the walk for short tokens); deeper
 * children live in one open-addressing hash table keyed by (parent node, byte), so the
 * whole 65k-token vocab takes a few MB instead of 256 pointers per node.
 * Built by rwkv_peft/data/tokenizer.py with the system C compiler, loaded with ctypes.
 */
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    uint32_t key;     /* ((parent << 8) | byte) + 1; 0 marks an empty slot */
    int32_t child;    /* node reached through the slot */
} Slot;

typedef struct {
    int32_t level1[256];     /* root's children by byte, -1 if none */
    int32_t *level2;         /* [b0 * 256 + b1]: node two bytes deep, -1 if none */
    Slot *slots;             /* children of nodes two or more bytes deep */
    uint64_t mask;           /* number of slots - 1 (power of two) */
    int32_t *value;          /* token id ending at each node, -1 if none */
    int32_t n_nodes;
} Trie;

static uint64_t slot_of(const Trie *t, uint32_t key)
{
    uint64_t h = ((uint64_t)key * 0x9E3779B97F4A7C15ULL) >> 20;
    for (;;) {
        h &= t->mask;
        if (t->slots[h].key == key || t->slots[h].key == 0)
            return h;
        h++;
    }
}

static int32_t find_child(const Trie *t, int32_t node, int32_t depth, uint8_t byte,
                          uint8_t prev)
{
    if (depth == 0)
        return t->level1[byte];
    if (depth == 1)
        return t->level2[(uint32_t)prev * 256 + byte];
    uint64_t h = slot_of(t, (((uint32_t)node << 8) | byte) + 1);
    return t->slots[h].key ? t->slots[h].child : -1;
}

static int32_t add_child(Trie *t, int32_t node, int32_t depth, uint8_t byte, uint8_t prev)
{
    int32_t *cell;
    if (depth == 0) {
        cell = &t->level1[byte];
    } else if (depth == 1) {
        cell = &t->level2[(uint32_t)prev * 256 + byte];
    } else {
        uint32_t key = (((uint32_t)node << 8) | byte) + 1;
        uint64_t h = slot_of(t, key);
        if (!t->slots[h].key) {
            t->slots[h].key = key;
            t->slots[h].child = -1;
        }
        cell = &t->slots[h].child;
    }
    if (*cell < 0)
        *cell = t->n_nodes++;
    return *cell;
}

void trie_free(Trie *t)
{
    if (!t)
        return;
    free(t->level2);
    free(t->slots);
    free(t->value);
    free(t);
}

/* data: all token bytes back to back; token i is data[offsets[i] .. offsets[i+1]). */
Trie *trie_build(const uint8_t *data, const int64_t *offsets, const int32_t *ids, int64_t n)
{
    int64_t total = offsets[n] + 1; /* upper bound on the node count */
    if (total >= (1 << 23))
        return NULL; /* node ids must fit the 24 bits of a slot key */
    Trie *t = calloc(1, sizeof(Trie));
    if (!t)
        return NULL;
    uint64_t cap = 1024;
    while (cap < 2 * (uint64_t)total)
        cap <<= 1;
    t->mask = cap - 1;
    t->level2 = malloc(sizeof(int32_t) * 65536);
    t->slots = calloc(cap, sizeof(Slot));
    t->value = malloc(sizeof(int32_t) * (size_t)total);
    if (!t->level2 || !t->slots || !t->value) {
        trie_free(t);
        return NULL;
    }
    for (int i = 0; i < 256; i++)
        t->level1[i] = -1;
    for (int i = 0; i < 65536; i++)
        t->level2[i] = -1;
    for (int64_t i = 0; i < total; i++)
        t->value[i] = -1;
    t->n_nodes = 1;
    for (int64_t i = 0; i < n; i++) {
        int32_t node = 0;
        for (int64_t j = offsets[i]; j < offsets[i + 1]; j++) {
            int32_t d = (int32_t)(j - offsets[i]);
            node = add_child(t, node, d, data[j], d ? data[j - 1] : 0);
        }
        t->value[node] = ids[i]; /* a repeated token keeps the last id, as rwkv does */
    }
    return t;
}

/* Writes at most n ids to out. Returns their count, or -(pos + 1) if no token matches
 * at byte pos (impossible when every single byte is in the vocab). */
int64_t trie_encode(const Trie *t, const uint8_t *src, int64_t n, int32_t *out)
{
    int64_t i = 0, k = 0;
    while (i < n) {
        int32_t node = 0, best = -1;
        int64_t best_end = i;
        for (int64_t j = i; j < n; j++) {
            node = find_child(t, node, (int32_t)(j - i), src[j], j > i ? src[j - 1] : 0);
            if (node < 0)
                break;
            if (t->value[node] >= 0) {
                best = t->value[node];
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
