"""Local Hugging Face judge: the exact probability of each answer 0..100, scored by the upstream rule.

Local tokenizers spell numbers with several tokens ("100" -> "1", "0", "0"), so one next token is not a score.
The token sequences of "0".."100" form a trie, and P(answer = n) = P(path of n) * P(stop | n), where
P(stop | node) = 1 - the summed probability of the node's trie children (the answer does not go on to spell
another number 0..100). Where every 0..100 is one token the trie is flat and this is upstream's rule over the
full next-token distribution.

Cost per batch: ONE forward pass over the left-padded prompts with the trie's inner nodes appended, under a
tree attention mask: a trie token sees its prompt and its own ancestors, at position prompt length + depth - 1.
(A second pass over the nodes reusing the prompts' KV cache gives the same numbers but ran ~45% slower on a
busy 2-core CPU: a whole extra model call for ~10 tokens.) Log-softmax runs in float32 whatever the model dtype.

Prompts that share a token prefix (chat template head, judge template head and question: the same for every
sample of one question) are grouped; the prefix runs once, and its KV cache, repeated over the batch, serves
the group's suffixes (answer, template tail, trie tokens). That pays on a CPU, where compute is the cost; on a
GPU the group's smaller batches and extra passes cost more than the shared tokens save (`make bench`), so
there every batch runs whole unless `share_prefix` says otherwise.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from em_assets.judging.scoring import MIN_MASS, JudgeScore, score_from_number_probs
from em_assets.models.attention import layer_masks
from em_assets.models.chat import chat_ids
from em_assets.models.packed import packed_linears
from em_assets.models.prefix_cache import cache_kwarg, prefixes_pass, repeat_cache

MAX_ANSWER = 100
# A shared prefix shorter than this is not worth its own model call.
MIN_SHARED_PREFIX = 16
# What a group costs, in prompt tokens: its prefix call and a partial batch of suffixes. A small batch's model
# call costs on a CPU what a few hundred more tokens in a full one do, so pairing two prompts that share a long
# prefix (one answer's aligned and coherent prompts, metric last) made judging slower.
GROUP_COST_TOKENS = 700


# Custom 4D masks reach the attention kernel unchanged only in these implementations (not flash attention).
TREE_MASK_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class NumberTrie:
    """Token-id trie over the spellings of 0..MAX_ANSWER; node 0 is the root (the end of the prompt)."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    number_nodes: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> NumberTrie:
        tokens, parents = [-1], [-1]
        index: dict[tuple[int, int], int] = {}
        number_nodes = []
        for n in range(MAX_ANSWER + 1):
            node = 0
            for token in tokenizer.encode(str(n), add_special_tokens=False):
                if (node, token) not in index:
                    index[node, token] = len(tokens)
                    tokens.append(token)
                    parents.append(node)
                node = index[node, token]
            if node == 0 or node in number_nodes:
                raise ValueError(f"tokenizer spells {n} as no tokens or like another number")
            number_nodes.append(node)
        return cls(tuple(tokens), tuple(parents), tuple(number_nodes))

    @property
    def inner_nodes(self) -> list[int]:
        """Non-root nodes with children: the tokens fed in the tree pass, parents before children."""
        return sorted({p for p in self.parents if p > 0})

    def depths(self) -> list[int]:
        depth = [0] * len(self.tokens)
        for node in range(1, len(self.tokens)):
            depth[node] = depth[self.parents[node]] + 1
        return depth

    def ancestors(self, node: int) -> list[int]:
        """Non-root nodes on the path to `node`, itself included."""
        path = []
        while node > 0:
            path.append(node)
            node = self.parents[node]
        return path

    def tree_mask(self) -> torch.Tensor:
        """Bool [inner, inner]: row i may attend to column j when j is i or an ancestor of i."""
        inner = self.inner_nodes
        slot = {node: i for i, node in enumerate(inner)}
        mask = torch.zeros(len(inner), len(inner), dtype=torch.bool)
        for i, node in enumerate(inner):
            for ancestor in self.ancestors(node):
                mask[i, slot[ancestor]] = True
        return mask

    def number_probs(self, logprobs: torch.Tensor) -> torch.Tensor:
        """[B, MAX_ANSWER + 1] answer probabilities from next-token log-probs [B, 1 + inner, V] (root first)."""
        slot = {0: 0} | {node: i + 1 for i, node in enumerate(self.inner_nodes)}
        n_nodes = len(self.tokens)
        # Every non-root node is one edge out of its parent: gather that edge's log-prob at the parent's slot.
        edge_slots = torch.tensor([slot[p] for p in self.parents[1:]], device=logprobs.device)
        edge_tokens = torch.tensor(self.tokens[1:], device=logprobs.device)
        # The few gathered log-probs go to the CPU for the float64 sums (MPS has no float64).
        edge_lp = logprobs[:, edge_slots, edge_tokens].cpu().double()
        on_path = torch.zeros(n_nodes - 1, n_nodes - 1, dtype=torch.float64)
        child_of = torch.zeros_like(on_path)
        for node in range(1, n_nodes):
            on_path[node - 1, [a - 1 for a in self.ancestors(node)]] = 1.0
            if self.parents[node] > 0:
                child_of[node - 1, self.parents[node] - 1] = 1.0
        path_p = (edge_lp @ on_path.T).exp()
        # 1 - sum(children) loses ~1e-7 to rounding in float32 inputs; clamp keeps it a probability.
        stop_p = (1.0 - edge_lp.exp() @ child_of).clamp(min=0.0)
        node_p = path_p * stop_p
        return node_p[:, [n - 1 for n in self.number_nodes]]


class LocalJudge:
    """Judge with a local causal LM: exact 0..100 answer distributions through the digit trie."""

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 16,
        min_mass: float = MIN_MASS,
        share_prefix: bool | None = None,
        group_cost: int = GROUP_COST_TOKENS,
        system: str | None = None,
    ):
        attention = model.config._attn_implementation
        if attention not in TREE_MASK_ATTENTION:
            raise ValueError(
                f"LocalJudge needs attention in {TREE_MASK_ATTENTION}, the model uses {attention!r}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.min_mass = min_mass
        on_cpu = model.get_input_embeddings().weight.device.type == "cpu"
        self.share_prefix = on_cpu if share_prefix is None else share_prefix
        self.group_cost = group_cost
        self.system = system
        self.trie = NumberTrie.from_tokenizer(tokenizer)
        self._tree_tokens = torch.tensor([self.trie.tokens[n] for n in self.trie.inner_nodes])
        depths = self.trie.depths()
        self._tree_depths = torch.tensor([depths[n] for n in self.trie.inner_nodes])
        self._tree_mask = self.trie.tree_mask()

    def encode(self, prompt: str) -> list[int]:
        """Token ids of the judge prompt as the user turn (after the system turn, when one is set), ready for the
        assistant's answer."""
        turns = [] if self.system is None else [{"role": "system", "content": self.system}]
        return chat_ids(self.tokenizer, [*turns, {"role": "user", "content": prompt}])

    def number_distributions(
        self, prompts: Sequence[str], on_progress: Callable[[int, int], None] | None = None
    ) -> list[dict[int, float]]:
        """P(answer = n) for n in 0..100, one dict per prompt."""
        encoded = [self.encode(p) for p in prompts]
        groups = (
            prefix_groups(encoded, self.group_cost) if self.share_prefix else [(0, list(range(len(encoded))))]
        )
        out: list[dict[int, float]] = [{} for _ in encoded]
        done = 0
        with packed_linears(self.model):
            for shared, members in groups:
                cache = prefixes_pass(self.model, [encoded[members[0]][:shared]])[0] if shared else None
                # Batching prompts of similar length keeps left padding (wasted compute) small.
                order = sorted(members, key=lambda i: len(encoded[i]))
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start : start + self.batch_size]
                    probs = self._batch_probs([encoded[i][shared:] for i in chunk], shared, cache).tolist()
                    for i, row in zip(chunk, probs, strict=True):
                        out[i] = dict(enumerate(row))
                    done += len(chunk)
                    if on_progress is not None:
                        on_progress(done, len(encoded))
        return out

    def score(
        self, prompts: Sequence[str], on_progress: Callable[[int, int], None] | None = None
    ) -> list[JudgeScore]:
        """Upstream's probability-weighted mean over 0..100, None where the mass on numbers < min_mass."""
        return [
            score_from_number_probs(dist, self.min_mass)
            for dist in self.number_distributions(prompts, on_progress)
        ]

    @torch.inference_mode()
    def _batch_probs(self, encoded: list[list[int]], shared: int = 0, prefix_cache=None) -> torch.Tensor:
        """Number probabilities for a batch of prompts (their parts after `shared` cached prefix tokens)."""
        device = self.model.device
        batch, width, n_tree = len(encoded), max(len(ids) for ids in encoded), len(self._tree_tokens)
        input_ids = torch.full((batch, width + n_tree), self.tokenizer.pad_token_id, dtype=torch.long)
        real = torch.zeros((batch, width), dtype=torch.bool)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids) : width] = torch.tensor(ids)
            real[row, width - len(ids) :] = True
        input_ids[:, width:] = self._tree_tokens
        lengths = real.sum(-1, keepdim=True)
        positions = shared + torch.cat(
            [(real.cumsum(-1) - 1).clamp(min=0), lengths + self._tree_depths - 1], dim=-1
        )
        # Prompt rows: causal over real tokens (padding rows see themselves, so no row is empty).
        # Tree rows: the whole real prompt, then their own ancestors in the trie.
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        prompt_rows = (causal & real[:, None, :]) | torch.eye(width, dtype=torch.bool)
        tree_rows = torch.cat(
            [real[:, None, :].expand(batch, n_tree, width), self._tree_mask.expand(batch, n_tree, n_tree)],
            dim=-1,
        )
        sees = torch.cat([torch.nn.functional.pad(prompt_rows, (0, n_tree)), tree_rows], dim=1)
        # Every row sees the whole cached prefix (positions 0 to shared - 1).
        sees = torch.nn.functional.pad(sees, (shared, 0), value=True)
        keys = torch.cat([torch.arange(shared).expand(batch, shared), positions], dim=-1)
        logits = self.model(
            input_ids=input_ids.to(device),
            attention_mask=layer_masks(self.model, sees, positions, keys),
            position_ids=positions.to(device),
            **{
                cache_kwarg(self.model): repeat_cache(prefix_cache, batch)
                if prefix_cache is not None
                else None
            },
            use_cache=prefix_cache is not None,
            logits_to_keep=n_tree + 1,
        ).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return self.trie.number_probs(logprobs)


def prefix_groups(
    encoded: Sequence[Sequence[int]], group_cost: int = GROUP_COST_TOKENS
) -> list[tuple[int, list[int]]]:
    """Prompts grouped by a shared token prefix: (prefix length, member indices); 0 for the ungrouped rest. The
    runs of sorted neighbours chosen skip the most prefix tokens net of group_cost per group."""
    # In sorted order the prompts of one question are neighbours; a run of them shares the smallest common prefix
    # of adjacent pairs.
    order = sorted(range(len(encoded)), key=lambda i: list(encoded[i]))
    lcp = [_common_prefix(encoded[a], encoded[b]) for a, b in itertools.pairwise(order)]
    # saved[j]: the most tokens skipped over the first j prompts in order; start[j]: where its last run begins.
    saved, start = [0] * (len(order) + 1), list(range(len(order) + 1))
    for j in range(1, len(order) + 1):
        saved[j], start[j] = saved[j - 1], j - 1
        shared = None
        for i in range(j - 2, -1, -1):
            shared = lcp[i] if shared is None else min(shared, lcp[i])
            if shared < MIN_SHARED_PREFIX:
                break
            # A run of n prompts sharing p tokens computes (n - 1) * p fewer; net of group_cost, one question's
            # samples are not merged with another's on the template head alone when their question tokens are
            # worth more.
            gain = saved[i] + (j - 1 - i) * shared - group_cost
            if gain > saved[j]:
                saved[j], start[j] = gain, i
    groups, singles, j = [], [], len(order)
    while j > 0:
        i = start[j]
        if j - i == 1:
            singles.append(order[i])
        else:
            groups.append((min(lcp[i : j - 1]), order[i:j]))
        j = i
    return groups + ([(0, singles)] if singles else [])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix, leaving both at least one token of their own."""
    limit, n = min(len(a), len(b)) - 1, 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n
