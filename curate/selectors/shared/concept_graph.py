"""PASER's Concept Consistency Graph (CCG): key-phrase concepts and the conflict rule.

Rule (docs/methods.md "PASER", the paper's CCG): vertices are concepts of accepted examples,
edges join concepts that appeared together in an accepted example. A candidate is
*rejected* when two of its concepts are both already known (vertices) but were never
accepted together (no edge); otherwise it is accepted and all its concepts are added
and linked pairwise (a clique). A concept accepted alone still becomes known (the paper's
V is "concepts of selected samples"; the authors' code only adds concepts that have a
partner, through networkx edges).

Concepts (`key_phrases`): the code uses RAKE (rake-nltk, which downloads NLTK data);
here a self-contained RAKE-like extractor, no network:
- text = prompt + response (the code's instruction + input + output), lower-cased;
- split into candidate phrases at punctuation and at stopwords (a built-in English list
  plus instruction boilerplate such as "write", "following", "answer"): a candidate is a
  maximal run of content words, where a content word has >= 3 characters, starts with a
  letter and is not a stopword; runs longer than `max_words` (3) are cut into pieces
  of at most `max_words`;
- score(phrase) = occurrences(phrase) x sum over its words of the word's frequency in the
  text (repeated words and phrases matter most), ties broken by first appearance;
- the top `n_concepts` (default 5) distinct phrases are the example's concepts.
"""

from __future__ import annotations

import re
from collections import Counter
from itertools import combinations
from typing import Iterable, Sequence

STOPWORDS = frozenset("""
a about above after again against all also am an and any are aren't as at be because been before
being below between both but by can can't cannot could couldn't did didn't do does doesn't doing don't
down during each either else ever every few for from further get gets got had hadn't has hasn't have
haven't having he he'd he'll he's her here here's hers herself him himself his how how's however i i'd
i'll i'm i've if in into is isn't it it's its itself just let let's like make many may me might more
most much must mustn't my myself need no nor not now of off often on once one only or other others
ought our ours ourselves out over own per please put rather really same say says see seem shall shan't
she she'd she'll she's should shouldn't since so some such than that that's the their theirs them
themselves then there there's these they they'd they'll they're they've this those though through thus
to too two under until up upon us use used using very via was wasn't way we we'd we'll we're we've
well were weren't what what's when when's where where's whether which while who who's whom whose why
why's will with within without won't would wouldn't yes yet you you'd you'll you're you've your yours
yourself yourselves
answer answers question questions write create given give following follow provide explain describe
generate response respond task input output example examples sentence text find return
""".split())

_TOKEN = re.compile(r"[a-z0-9][\w'+#-]*", re.UNICODE)
_BREAK = re.compile(r"[.!?;:,()\[\]{}\"\n\r\t|/\\<>=*`~^&$@%]+")


def _is_content(word: str) -> bool:
    return len(word) >= 3 and word[0].isalpha() and word not in STOPWORDS


def candidate_phrases(text: str, max_words: int = 3) -> list[str]:
    """Maximal runs of content words (between punctuation and stopwords), cut to max_words."""
    phrases = []
    for chunk in _BREAK.split(text.lower()):
        run: list[str] = []
        for word in _TOKEN.findall(chunk) + [""]:
            word = word.strip("'-")
            if word and _is_content(word):
                run.append(word)
                continue
            for i in range(0, len(run), max_words):
                phrases.append(" ".join(run[i:i + max_words]))
            run = []
    return phrases


def key_phrases(text: str, n_concepts: int = 5, max_words: int = 3) -> list[str]:
    """The example's concepts: top `n_concepts` candidate phrases by the module's score."""
    phrases = candidate_phrases(text, max_words)
    if not phrases:
        return []
    word_freq = Counter(w for p in phrases for w in p.split())
    counts = Counter(phrases)
    first = {}
    for i, p in enumerate(phrases):
        first.setdefault(p, i)
    ranked = sorted(counts, key=lambda p: (-counts[p] * sum(word_freq[w] for w in p.split()), first[p]))
    return ranked[:n_concepts]


def record_concepts(record: dict, n_concepts: int = 5, text: str = "prompt_response") -> list[str]:
    body = record["prompt"] if text == "prompt" else f"{record['prompt']}\n{record['response']}"
    return key_phrases(body, n_concepts)


class ConceptGraph:
    """The CCG: known concepts and which pairs were accepted together."""

    def __init__(self):
        self.neighbours: dict[str, set[str]] = {}

    def conflict(self, concepts: Sequence[str]) -> tuple[str, str] | None:
        """The first pair (in the given order) of known concepts never accepted together."""
        known = [c for c in dict.fromkeys(concepts) if c in self.neighbours]
        for a, b in combinations(known, 2):
            if b not in self.neighbours[a]:
                return a, b
        return None

    def add(self, concepts: Iterable[str]) -> None:
        concepts = list(dict.fromkeys(concepts))
        for c in concepts:
            self.neighbours.setdefault(c, set())
        for a, b in combinations(concepts, 2):
            self.neighbours[a].add(b)
            self.neighbours[b].add(a)


def run_ccg(concept_lists: Sequence[Sequence[str]]) -> list[tuple[int | None, tuple[str, str] | None, int]]:
    """Greedy CCG over candidates in priority order, run to exhaustion.

    Returns per candidate (accept_rank or None, conflicting pair or None, accepted_before):
    accept_rank counts acceptances from 0; accepted_before is how many candidates were
    accepted earlier in the order. Stopping at a budget n gives exactly the candidates
    with accept_rank < n (later decisions never change earlier ones), which is what
    lets PASER size budgets after seeing how many candidates the CCG lets through.
    """
    graph = ConceptGraph()
    out = []
    accepted = 0
    for concepts in concept_lists:
        pair = graph.conflict(concepts)
        if pair is None:
            out.append((accepted, None, accepted))
            graph.add(concepts)
            accepted += 1
        else:
            out.append((None, pair, accepted))
    return out
