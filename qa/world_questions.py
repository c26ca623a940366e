"""Questions over the synthetic world: 1-hop lookups and 2-hop compositions (MuSiQue-like), each with one answer.

A template names one subject entity and follows relations that have exactly one value for it; the answer is
stated in the last supporting passage. Templates that go through "the film X starred in" or "the film X
directed" only take subjects with exactly one such film.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from qa.world_entities import World

Key = tuple[str, int]
Built = tuple[str, list[str], list[Key]]


@dataclass(frozen=True, slots=True)
class Template:
    """One question shape: relation name, hop count, answer type, eligible subjects and a builder."""

    relation: str
    hops: int
    answer_type: str
    subjects: list[int]
    build: Callable[[int], Built]


def _templates(w: World) -> list[Template]:
    # One-letter aliases keep the template table below readable: persons, cities, countries, orgs, films.
    P, C, K, Og, F = w.persons, w.cities, w.countries, w.organisations, w.films

    def person(i: int) -> list[str]:
        return [P[i].name, P[i].surname]

    def city(i: int) -> list[str]:
        return [C[i].name, f"{C[i].name} City"]

    def country(i: int) -> list[str]:
        return [K[i].name, K[i].formal]

    def org(i: int) -> list[str]:
        # The bare stem is an alias only when it is the organisation's own word, not a city's name.
        return [Og[i].name] if Og[i].base in city_names else [Og[i].name, Og[i].base]

    city_names = {c.name for c in C}
    people, cities, countries = range(len(P)), range(len(C)), range(len(K))
    orgs, films = range(len(Og)), range(len(F))
    one_starred = [i for i in people if len(P[i].starred) == 1]
    one_directed = [i for i in people if len(P[i].directed) == 1]
    non_capital = [i for i in cities if K[C[i].country].capital != i]
    employed = [i for i in people if P[i].founded < 0]
    # "Velmora Bank" headquartered in Velmora would name the bridge city in the question itself.
    hq_unnamed = [i for i in orgs if C[Og[i].headquarters].name not in Og[i].name]
    return [
        # 1-hop
        Template("birthplace", 1, "city", list(people), lambda i: (
            f"In which city was {P[i].name} born?", city(P[i].birthplace), [("person", i)])),
        Template("birth_year", 1, "year", list(people), lambda i: (
            f"In what year was {P[i].name} born?", [str(P[i].birth_year)], [("person", i)])),
        Template("employer", 1, "organisation", employed, lambda i: (
            f"Which organisation does {P[i].name} work for?", org(P[i].employer), [("person", i)])),
        Template("country_of_city", 1, "country", list(cities), lambda i: (
            f"In which country is {C[i].name} located?", country(C[i].country), [("city", i)])),
        Template("city_founded", 1, "year", list(cities), lambda i: (
            f"In what year was {C[i].name} founded?", [str(C[i].founded)], [("city", i)])),
        Template("mayor", 1, "person", list(cities), lambda i: (
            f"Who is the mayor of {C[i].name}?", person(C[i].mayor), [("city", i)])),
        Template("river", 1, "river", list(cities), lambda i: (
            f"On which river does {C[i].name} lie?", [C[i].river, f"{C[i].river} River"], [("city", i)])),
        Template("capital", 1, "city", list(countries), lambda i: (
            f"What is the capital of {K[i].name}?", city(K[i].capital), [("country", i)])),
        Template("headquarters", 1, "city", list(orgs), lambda i: (
            f"In which city is {Og[i].name} headquartered?", city(Og[i].headquarters), [("organisation", i)])),
        Template("founder", 1, "person", list(orgs), lambda i: (
            f"Who founded {Og[i].name}?", person(Og[i].founder), [("organisation", i)])),
        Template("org_founded", 1, "year", list(orgs), lambda i: (
            f"In what year was {Og[i].name} founded?", [str(Og[i].founded)], [("organisation", i)])),
        Template("director", 1, "person", list(films), lambda i: (
            f"Who directed the film {F[i].title}?", person(F[i].director), [("film", i)])),
        Template("release_year", 1, "year", list(films), lambda i: (
            f"In what year was the film {F[i].title} released?", [str(F[i].year)], [("film", i)])),
        Template("lead_actor", 1, "person", list(films), lambda i: (
            f"Who played the lead role in the film {F[i].title}?", person(F[i].lead), [("film", i)])),
        # 2-hop
        Template("birthplace>country", 2, "country", list(people), lambda i: (
            f"In which country is the birthplace of {P[i].name}?", country(C[P[i].birthplace].country),
            [("person", i), ("city", P[i].birthplace)])),
        Template("employer>headquarters", 2, "city", employed, lambda i: (
            f"In which city is the organisation that {P[i].name} works for headquartered?",
            city(Og[P[i].employer].headquarters), [("person", i), ("organisation", P[i].employer)])),
        Template("employer>founder", 2, "person", employed, lambda i: (
            f"Who founded the organisation that {P[i].name} works for?", person(Og[P[i].employer].founder),
            [("person", i), ("organisation", P[i].employer)])),
        Template("starred>director", 2, "person", one_starred, lambda i: (
            f"Who directed the film that {P[i].name} starred in?", person(F[P[i].starred[0]].director),
            [("person", i), ("film", P[i].starred[0])])),
        Template("directed>release_year", 2, "year", one_directed, lambda i: (
            f"In what year was the film directed by {P[i].name} released?", [str(F[P[i].directed[0]].year)],
            [("person", i), ("film", P[i].directed[0])])),
        Template("director>birthplace", 2, "city", list(films), lambda i: (
            f"In which city was the director of {F[i].title} born?", city(P[F[i].director].birthplace),
            [("film", i), ("person", F[i].director)])),
        Template("director>birth_year", 2, "year", list(films), lambda i: (
            f"In what year was the director of {F[i].title} born?", [str(P[F[i].director].birth_year)],
            [("film", i), ("person", F[i].director)])),
        Template("lead_actor>employer", 2, "organisation", list(films), lambda i: (
            f"Which organisation does the lead actor of {F[i].title} work for?", org(P[F[i].lead].employer),
            [("film", i), ("person", F[i].lead)])),
        Template("mayor>birth_year", 2, "year", list(cities), lambda i: (
            f"In what year was the mayor of {C[i].name} born?", [str(P[C[i].mayor].birth_year)],
            [("city", i), ("person", C[i].mayor)])),
        Template("country>capital", 2, "city", non_capital, lambda i: (
            f"What is the capital of the country where {C[i].name} is located?", city(K[C[i].country].capital),
            [("city", i), ("country", C[i].country)])),
        Template("capital>mayor", 2, "person", list(countries), lambda i: (
            f"Who is the mayor of the capital of {K[i].name}?", person(C[K[i].capital].mayor),
            [("country", i), ("city", K[i].capital)])),
        Template("founder>birthplace", 2, "city", list(orgs), lambda i: (
            f"Where was the founder of {Og[i].name} born?", city(P[Og[i].founder].birthplace),
            [("organisation", i), ("person", Og[i].founder)])),
        Template("headquarters>country", 2, "country", hq_unnamed, lambda i: (
            f"In which country is {Og[i].name} headquartered?", country(C[Og[i].headquarters].country),
            [("organisation", i), ("city", Og[i].headquarters)])),
    ]


@dataclass(frozen=True, slots=True)
class Question:
    """One drawn question before it gets an id and corpus ids."""

    text: str
    golden_answers: list[str]
    supporting: list[Key]
    hops: int
    relation: str
    answer_type: str


class QuestionPool:
    """Draws distinct questions, half 1-hop and half 2-hop, spread evenly over relations."""

    def __init__(self, rng: random.Random, world: World) -> None:
        self.rng = rng
        self.queues: dict[int, list[tuple[Template, list[int]]]] = {1: [], 2: []}
        for template in _templates(world):
            subjects = list(template.subjects)
            rng.shuffle(subjects)
            if subjects:
                self.queues[template.hops].append((template, subjects))

    @property
    def capacity(self) -> int:
        """How many distinct questions remain."""
        return sum(len(s) for queues in self.queues.values() for _, s in queues)

    def draw(self, n: int) -> list[Question]:
        """Take `n` questions that no earlier draw returned."""
        if n > self.capacity:
            raise ValueError(f"the world holds only {self.capacity} more distinct questions, {n} requested; "
                             "raise num_passages or lower num_train/num_dev")
        drawn = []
        for k in range(n):
            hops = 1 + k % 2
            if not self.queues[hops]:
                hops = 3 - hops
            queues = self.queues[hops]
            slot = self.rng.randrange(len(queues))
            template, subjects = queues[slot]
            subject = subjects.pop()
            if not subjects:
                queues.pop(slot)
            text, answers, supporting = template.build(subject)
            drawn.append(Question(text, answers, supporting, template.hops, template.relation,
                                  template.answer_type))
        return drawn
