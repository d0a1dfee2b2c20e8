"""The built-in ``lookup`` task: reverse copying (learnable disagreement) and key lookups (disagreement
that may lie outside the student's reach), in one response.

    prompt    " k1 k2 k3 | w1 w2 w3 w4 w5 w6 ="
    response  " w6 w5 ; T[k1] ; w4 w3 ; T[k2] ; w2 w1 ; T[k3]"   (14 tokens + EOS)

Every word is one Qwen BPE token (a space-prefixed lowercase word of 4-8 letters that encodes to itself),
drawn from three disjoint sets: list words (the rule copies them back in reverse: the answer is a word of
the prompt, so a student that has learnt to copy has it among its top-16), keys, and values. ``T`` is a
fixed random key -> value table; values never appear in prompts, so a lookup cannot be copied: it is
either memorised or not. The keys fall into three groups by what the prepared *student* was taught:

- ``known``: SFT on ``T`` (the teacher's answer is the student's top-1);
- ``brief``: SFT on ``T`` in a third of the examples and on a wrong table ``T'`` in the rest, so the
  teacher's answer sits in the student's top-16 but not top-1 (high D, high C: teachable lookups);
- ``wrong``: SFT on ``T'`` only: the student is confidently wrong and the teacher's answer, a value the
  student never produced for any key, lies outside its top-16 (high D, low C).

The student's SFT has two phases: first the rule slots hold random words of the prompt (it learns the
candidates, not their order) while the lookups are learnt, then the right words, until ~30% of the rule
slots are right: its rule errors are then mostly the wrong word of the prompt (high C).

The teacher is SFT'd on ``T`` for every key and on the rule, with corrupted contexts (wrong words at some
slots, not trained on) so that it continues correctly after a student's mistakes. Values of ``T'`` are
disjoint from those of ``T``. The task is large on purpose: hundreds of task tokens, far more than
K = 16, so that C measures whether the teacher's answer is among the student's candidates, not the
teacher's leak onto the ~151k ids the task never uses (with a 15-token alphabet, as in
``long_arithmetic``, the student's top-16 held every task token and 1 - C was that leak).

Per-slot checking: the response's whitespace-separated items are compared by position with the correct
ones; the headline is the fraction of answer slots (6 rule words, 3 lookup values) that are right.
Held-out, validation and training prompts are disjoint (``split_sizes``), as for the other built-in tasks.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from .task import Example, split_sizes

GROUPS = ("known", "brief", "wrong")  # key groups, by what the student's SFT taught it
ANSWER_CLASSES = ("rule",) + GROUPS  # classes of the answer slots (the headline counts these)
CLASSES = ANSWER_CLASSES + ("separator", "eos")  # classes of response positions

_WORD = re.compile(r"^ [a-z]{4,8}$")
_CANDIDATES = 4096  # the most frequent (lowest-rank) word tokens the task draws from
N_KEYS = 3
N_WORDS = 6
# response items: ("rule", i) copies prompt list word i; ("lookup", j) is T[key j]; ("sep",) is " ;"
LAYOUT = (("rule", 5), ("rule", 4), ("sep",), ("lookup", 0), ("sep",), ("rule", 3), ("rule", 2), ("sep",),
          ("lookup", 1), ("sep",), ("rule", 1), ("rule", 0), ("sep",), ("lookup", 2))
SEP, BAR, EQ = " ;", " |", " ="
CORRUPT_SLOT = 1 / 3  # the teacher's corrupted contexts: each answer slot wrong with this probability
DESIGN = 1  # bump when the words, tables, splits or SFT streams change: part of the prepared models' key


@dataclass(frozen=True)
class LookupExample(Example):
    """An ``Example`` whose ``unscored_tokens`` are response token indices SFT does not train on."""

    unscored_tokens: tuple = ()


@functools.lru_cache(maxsize=4)
def word_tokens(tokenizer) -> Tuple[int, ...]:
    """Ids of single-token words: ' ' + 4-8 lowercase letters, encoding to exactly that id, lowest ranks first
    (the first ``_CANDIDATES``; cached per tokenizer: the scan takes seconds)."""
    out = []
    for i in sorted(tokenizer._tok.decoder):
        raw = tokenizer._tok.decoder[i]
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if _WORD.match(text) and tokenizer.encode(text) == [i]:
            out.append(i)
            if len(out) == _CANDIDATES:
                break
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _builtin_tokenizer():
    from .models import QwenBPETokenizer

    return QwenBPETokenizer()


class LookupTask:
    """Reverse copy + key lookups (module docstring). ``keys_per_group`` keys in each of the three groups;
    ``3 * keys_per_group`` values for ``T`` and ``2 * keys_per_group`` more for ``T'``."""

    name = "lookup"
    max_response_tokens = len(LAYOUT) + 1
    classes = CLASSES  # what ``position_classes`` names (the driver logs what it kept by class)

    def __init__(self, num_eval: int = 512, seed: int = 0, list_words: int = 192, keys_per_group: int = 48,
                 brief_share: float = 1 / 3, tokenizer=None):
        if list_words < N_WORDS or keys_per_group < N_KEYS:
            raise ValueError(f"lookup: list_words={list_words} must be >= {N_WORDS} and "
                             f"keys_per_group={keys_per_group} >= {N_KEYS}")
        if not 0 < brief_share < 1:
            raise ValueError(f"lookup: brief_share={brief_share} must be in (0, 1)")
        del seed  # the words, the tables and the held-out set are the same for every run seed
        if tokenizer is None:
            tokenizer = _builtin_tokenizer()
        self.tokenizer, self.brief_share = tokenizer, brief_share
        self.prep_key = ("lookup", DESIGN, list_words, keys_per_group, brief_share)  # prepare._data_key
        g = keys_per_group
        ids = list(word_tokens(tokenizer))
        need = list_words + 3 * g + 5 * g
        if need > len(ids):
            raise ValueError(f"lookup: {need} distinct words needed, {len(ids)} available")
        random.Random(3_000_017).shuffle(ids)
        text = lambda i: tokenizer.decode([i]).strip()  # noqa: E731
        self.list_words = [text(i) for i in ids[:list_words]]
        keys = [text(i) for i in ids[list_words:list_words + 3 * g]]
        values = [text(i) for i in ids[list_words + 3 * g:need]]
        self.group = {k: GROUPS[n // g] for n, k in enumerate(keys)}
        self.keys, self.values = keys, values
        self.table = dict(zip(keys, values[:3 * g]))  # T: what the teacher learns, for every key
        self.wrong_table = dict(zip(keys[g:], values[3 * g:]))  # T': brief and wrong keys, the student's
        self._build_splits(num_eval)

    def _build_splits(self, num_eval: int) -> None:
        n = len(self.keys) ** N_KEYS * len(self.list_words) ** N_WORDS  # far more prompts than ever drawn
        reserved, num_val = split_sizes(n, num_eval)
        rng = random.Random(4_000_037)
        drawn, seen = [], set()  # distinct prompts in the order drawn: held-out first, then validation
        while len(drawn) < reserved + num_val:
            p = self._draw(rng)
            if p not in seen:
                seen.add(p)
                drawn.append(p)
        self.eval_items = drawn[:num_eval]
        self.validation_items = drawn[reserved:]
        self._not_trained = frozenset(drawn)
        self.split = (reserved, num_val)

    def _draw(self, rng: random.Random) -> Tuple[tuple, tuple]:
        return tuple(rng.sample(self.keys, N_KEYS)), tuple(rng.sample(self.list_words, N_WORDS))

    # ------------------------------------------------------------ prompts, responses, examples

    @staticmethod
    def prompt(keys: Sequence[str], words: Sequence[str]) -> str:
        return "".join(f" {k}" for k in keys) + BAR + "".join(f" {w}" for w in words) + EQ

    def response_items(self, keys, words, table: Dict[str, str] = None) -> List[str]:
        table = self.table if table is None else table
        out = []
        for item in LAYOUT:
            out.append(words[item[1]] if item[0] == "rule" else table[keys[item[1]]] if item[0] == "lookup"
                       else SEP.strip())
        return out

    def format(self, keys, words) -> LookupExample:
        response = "".join(f" {w}" for w in self.response_items(keys, words))
        return LookupExample(prompt=self.prompt(keys, words), answer=response)

    def parse_prompt(self, prompt: str) -> Tuple[List[str], List[str]]:
        head, _, tail = prompt.partition(BAR)
        return head.split(), tail.replace(EQ, " ").split()

    def _train_item(self, rng: random.Random):
        while True:
            item = self._draw(rng)
            if item not in self._not_trained:
                return item

    def train_example(self, rng: random.Random) -> LookupExample:
        return self.format(*self._train_item(rng))

    def eval_examples(self) -> List[LookupExample]:
        return [self.format(k, w) for k, w in self.eval_items]

    def validation_examples(self) -> List[LookupExample]:
        return [self.format(k, w) for k, w in self.validation_items]

    # ------------------------------------------------------------ classes and checking

    def position_classes(self, example: Example) -> List[str]:
        """The class of every response token (``CLASSES``), EOS included: what the response should hold there."""
        keys, _ = self.parse_prompt(example.prompt)
        return [("rule" if item[0] == "rule" else self.group[keys[item[1]]] if item[0] == "lookup" else "separator")
                for item in LAYOUT] + ["eos"]

    def slot_results(self, response: str, example: Example) -> List[Tuple[str, bool]]:
        """(class, correct) for each answer slot: the response's items compared by position."""
        got, want = response.split(), example.answer.split()
        classes = self.position_classes(example)
        return [(classes[i], i < len(got) and got[i] == want[i]) for i, c in enumerate(classes[:len(LAYOUT)])
                if c in ANSWER_CLASSES]

    @staticmethod
    def check(response: str, answer: str) -> bool:
        """Whole-response exact match (items compared, surrounding whitespace ignored)."""
        return response.split() == answer.split()

    def token_ids(self, tokenizer) -> List[int]:
        """Every id the task's prompts and responses use, EOS included (each word is one token)."""
        words = self.list_words + self.keys + self.values + [s.strip() for s in (SEP, BAR, EQ)]
        ids = {tokenizer.eos_id}
        for w in words:
            got = tokenizer.encode(" " + w)
            if len(got) != 1:
                raise ValueError(f"lookup: {w!r} is not one token")
            ids.update(got)
        return sorted(ids)

    def slot_accuracy(self, pairs) -> Dict[str, float]:
        """Over (response, example) pairs: the headline (``accuracy``: answer slots right over all classes),
        ``accuracy/<class>`` for each answer class present and ``exact_match`` (whole responses)."""
        right, total, exact = {}, {}, 0
        for response, ex in pairs:
            exact += self.check(response, ex.answer)
            for c, ok in self.slot_results(response, ex):
                right[c] = right.get(c, 0) + ok
                total[c] = total.get(c, 0) + 1
        out = {"accuracy": sum(right.values()) / max(1, sum(total.values()))}
        out.update({f"accuracy/{c}": right[c] / total[c] for c in ANSWER_CLASSES if c in total})
        out["exact_match"] = exact / max(1, len(pairs))
        return out

    # ------------------------------------------------------------ SFT streams of the prepared models

    def sft_phases(self, role: str, rng: random.Random, target: float, noise: float) -> list:
        """The compact SFT of ``role`` as phases ``(name, example(), score(pairs), target)``, run in order,
        each until ``score`` of the greedy validation responses reaches its target (prepare.compact_sft).

        teacher: every slot right (``T``, corrupted contexts with probability ``noise``) until its worst
        answer class reaches ``target``. student: first the candidates (rule slots hold random prompt
        words) and the lookups, until the known keys are answered with ``T``, the brief and wrong keys with
        ``T'`` and rule slots hold prompt words, each in 90% of cases; then the rule in order, until
        ``target`` of the rule slots are right."""
        if role == "teacher":
            worst = lambda pairs: min(v for k, v in self.slot_accuracy(pairs).items() if k.startswith("accuracy/"))  # noqa: E731
            return [("sft", lambda: self.teacher_example(rng, noise), worst, target)]
        rule = lambda pairs: self.slot_accuracy(pairs)["accuracy/rule"]  # noqa: E731
        return [("candidates", lambda: self.student_example(rng, ordered=False), self._candidates_learnt, 0.9),
                ("rule", lambda: self.student_example(rng, ordered=True), rule, target)]

    def _candidates_learnt(self, pairs) -> float:
        """The lowest of: known lookups answered with T, brief and wrong lookups with T', rule slots
        holding a word of the prompt (what the student's first SFT phase teaches)."""
        hits = {"known": [0, 0], "T'": [0, 0], "copy": [0, 0]}
        for response, ex in pairs:
            keys, words = self.parse_prompt(ex.prompt)
            got = response.split()
            for i, item in enumerate(LAYOUT):
                said = got[i] if i < len(got) else None
                if item[0] == "rule":
                    h, ok = hits["copy"], said in words
                elif item[0] == "lookup":
                    k = keys[item[1]]
                    known = self.group[k] == "known"
                    h, ok = hits["known" if known else "T'"], said == (self.table if known else self.wrong_table)[k]
                else:
                    continue
                h[0] += ok
                h[1] += 1
        return min(a / max(1, n) for a, n in hits.values())

    def teacher_example(self, rng: random.Random, noise: float) -> LookupExample:
        """``T`` for every key. With probability ``noise`` the context is corrupted as a student's rollout
        would be: each answer slot independently with probability ``CORRUPT_SLOT`` (at least one) holds a
        wrong word (a word of the prompt, another list word or a value), not trained on; the other slots
        stay right, so the teacher learns to answer every slot whatever was written before it."""
        keys, words = self._train_item(rng)
        items = self.response_items(keys, words)
        unscored = []
        if rng.random() < noise:
            slots = [i for i, item in enumerate(LAYOUT) if item[0] != "sep"]
            unscored = [i for i in slots if rng.random() < CORRUPT_SLOT] or [slots[rng.randrange(len(slots))]]
            for i in unscored:  # a student mostly writes a wrong word of the prompt: half of them are
                pool = (words, words, self.list_words, self.values)[rng.randrange(4)]
                wrong = pool[rng.randrange(len(pool))]
                while wrong == items[i]:
                    wrong = pool[rng.randrange(len(pool))]
                items[i] = wrong
        return self._example(keys, words, items, tuple(unscored))

    def student_example(self, rng: random.Random, ordered: bool) -> LookupExample:
        """Lookups per key group (``known``: T, ``brief``: T with probability ``brief_share`` else T',
        ``wrong``: T'). Rule slots: the right word when ``ordered`` (the student's second phase), else a
        word of the prompt drawn at random (the first phase: the student learns which words are candidates,
        not their order, so that at ~30% rule accuracy the right word is among its top-16)."""
        keys, words = self._train_item(rng)
        table = {k: (self.table[k] if self.group[k] == "known" or
                     self.group[k] == "brief" and rng.random() < self.brief_share else self.wrong_table[k])
                 for k in keys}
        items = self.response_items(keys, words, table)
        if not ordered:
            items = [words[rng.randrange(N_WORDS)] if item[0] == "rule" else w for item, w in zip(LAYOUT, items)]
        return self._example(keys, words, items, ())

    def _example(self, keys, words, items, unscored) -> LookupExample:
        return LookupExample(prompt=self.prompt(keys, words), answer="".join(f" {w}" for w in items),
                             unscored_tokens=unscored)
