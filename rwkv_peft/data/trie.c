/* Greedy longest-match byte trie for the RWKV World tokenizer.
 *
 * Same semantics as rwkv.rwkv_tokenizer.TRIE_TOKENIZER: from the current position, walk
 * the trie as far as the input allows and emit the deepest node that ends a token.
 * Children live in one open-addressing hash table keyed by (parent node, byte), so the
 * whole 65k-token vocab takes a few MB instead of 256 pointers per node.
 * Built by rwkv_peft/data/tokenizer.py with the system C compiler, loaded with ctypes.
 */
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    uint64_t mask;    /* table size - 1 (power of two) */
    uint64_t *keys;   /* ((parent << 8) | byte) + 1; 0 marks an empty slot */
    int32_t *child;   /* node reached through the slot */
    int32_t *value;   /* token id ending at each node, -1 if none */
    int32_t n_nodes;
    int32_t max_nodes;
} Trie;

static uint64_t slot_of(const Trie *t, uint64_t key)
{
    uint64_t h = (key * 0x9E3779B97F4A7C15ULL) >> 17;
    for (;;) {
        h &= t->mask;
        if (t->keys[h] == key || t->keys[h] == 0)
            return h;
        h++;
    }
}

static int32_t find_child(const Trie *t, int32_t node, uint8_t byte)
{
    uint64_t h = slot_of(t, (((uint64_t)node << 8) | byte) + 1);
    return t->keys[h] ? t->child[h] : -1;
}

void trie_free(Trie *t)
{
    if (!t)
        return;
    free(t->keys);
    free(t->child);
    free(t->value);
    free(t);
}

/* data: all token bytes back to back; token i is data[offsets[i] .. offsets[i+1]). */
Trie *trie_build(const uint8_t *data, const int64_t *offsets, const int32_t *ids, int64_t n)
{
    Trie *t = calloc(1, sizeof(Trie));
    if (!t)
        return NULL;
    int64_t total = offsets[n] + 1;
    uint64_t cap = 1024;
    while (cap < 2 * (uint64_t)total)
        cap <<= 1;
    t->mask = cap - 1;
    t->max_nodes = (int32_t)total;
    t->keys = calloc(cap, sizeof(uint64_t));
    t->child = calloc(cap, sizeof(int32_t));
    t->value = malloc(sizeof(int32_t) * (size_t)total);
    if (!t->keys || !t->child || !t->value) {
        trie_free(t);
        return NULL;
    }
    for (int64_t i = 0; i < total; i++)
        t->value[i] = -1;
    t->n_nodes = 1;
    for (int64_t i = 0; i < n; i++) {
        int32_t node = 0;
        for (int64_t j = offsets[i]; j < offsets[i + 1]; j++) {
            uint64_t key = (((uint64_t)node << 8) | data[j]) + 1;
            uint64_t h = slot_of(t, key);
            if (!t->keys[h]) {
                t->keys[h] = key;
                t->child[h] = t->n_nodes++;
            }
            node = t->child[h];
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
            node = find_child(t, node, src[j]);
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
