"""Entities of the synthetic world and their relations: countries, cities, people, organisations, films."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from qa.world_names import (
    CITY_ENDINGS,
    COUNTRY_ENDINGS,
    GIVEN_ENDINGS,
    RIVER_ENDINGS,
    SURNAME_ENDINGS,
    NameForge,
    between,
    pick,
)

FORMS = ("Republic", "Kingdom", "Federation", "Commonwealth", "Principality", "Union")
CITY_PREFIXES = ("North", "South", "New", "Port", "Upper", "Lower")
ORG_KINDS = (
    ("Industries", "manufacturing"), ("Holdings", "investment"), ("Bank", "banking"),
    ("Press", "publishing"), ("Studios", "film production"), ("Institute", "research"),
    ("Foundation", "charitable"), ("Airways", "aviation"), ("Systems", "software"),
    ("Shipping", "shipping"), ("Pharma", "pharmaceutical"), ("Energy", "energy"),
)
OCCUPATIONS = (
    "engineer", "architect", "novelist", "economist", "chemist", "journalist", "painter",
    "historian", "physician", "lawyer", "composer", "geologist", "photographer", "surveyor",
)
FILM_PATTERNS = (
    "The {w} Affair", "Return to {w}", "{w} Rising", "Night over {w}", "The Last {w}",
    "Letters from {w}", "The {w} Sessions", "Beyond {w}", "A Winter in {w}", "{w}",
    "The House of {w}", "Songs of {w}",
)
GENRES = ("drama", "comedy", "thriller", "documentary", "science fiction", "historical", "romance", "war")
LATEST_YEAR = 2023


@dataclass(slots=True)
class Country:
    """A country; `capital` indexes World.cities."""

    name: str
    form: str
    currency: str
    independence: int
    capital: int = -1
    cities: list[int] = field(default_factory=list)

    @property
    def formal(self) -> str:
        """The official long name, e.g. "Republic of Elsovia"."""
        return f"{self.form} of {self.name}"


@dataclass(slots=True)
class City:
    """A city in one country, on one river, with one mayor (a person index)."""

    name: str
    country: int
    founded: int
    river: str
    population: int
    mayor: int = -1


@dataclass(slots=True)
class Person:
    """A person; indices point into World lists, -1 where the relation does not hold."""

    given: str
    surname: str
    birth_year: int
    birthplace: int
    occupation: str = ""
    employer: int = -1
    founded: int = -1
    mayor_of: int = -1
    directed: list[int] = field(default_factory=list)
    starred: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        """Full name as written in titles and answers."""
        return f"{self.given} {self.surname}"


@dataclass(slots=True)
class Organisation:
    """An organisation headquartered in one city, founded by one person."""

    name: str
    base: str
    industry: str
    headquarters: int
    founded: int = 0
    founder: int = -1


@dataclass(slots=True)
class Film:
    """A film with one director and one lead actor (both person indices)."""

    title: str
    genre: str
    director: int
    lead: int
    year: int


@dataclass(slots=True)
class World:
    """Every entity of one generated world."""

    countries: list[Country]
    cities: list[City]
    persons: list[Person]
    organisations: list[Organisation]
    films: list[Film]


def entity_counts(num_passages: int) -> dict[str, int]:
    """How many entities of each type a corpus of about `num_passages` passages holds (~55% entity passages)."""
    n = num_passages
    return {
        "countries": max(2, round(n * 0.008)),
        "cities": max(6, round(n * 0.06)),
        "organisations": max(4, round(n * 0.05)),
        "films": max(4, round(n * 0.08)),
        "persons": max(24, round(n * 0.33)),
    }


def build_world(rng: random.Random, forge: NameForge, counts: dict[str, int]) -> World:
    """Draw every entity and relation; all names come from `forge` so none repeats."""
    countries = [
        Country(forge.word(COUNTRY_ENDINGS), pick(rng, FORMS), forge.word(), between(rng, 1650, 1990))
        for _ in range(counts["countries"])
    ]
    cities = _cities(rng, forge, counts["cities"], countries)
    persons = _persons(rng, forge, counts["persons"], len(cities))
    order = list(range(len(persons)))
    rng.shuffle(order)
    # Disjoint roles keep each person's passage coherent (a mayor is a politician, a director directs).
    n_cities, n_orgs, n_films = len(cities), counts["organisations"], counts["films"]
    mayors = order[:n_cities]
    founders = order[n_cities:n_cities + n_orgs]
    n_directors = max(2, n_films // 2)
    directors = order[n_cities + n_orgs:n_cities + n_orgs + n_directors]
    actors = order[n_cities + n_orgs + n_directors:n_cities + n_orgs + n_directors + max(2, n_films * 4 // 5)]
    if len(actors) < 2:
        raise ValueError("world too small for its films; raise num_passages")
    for ci, pi in enumerate(mayors):
        cities[ci].mayor = pi
        persons[pi].mayor_of = ci
        persons[pi].occupation = "politician"
    organisations = _organisations(rng, forge, n_orgs, cities, persons, founders)
    for p in persons:
        if p.employer < 0:
            p.employer = rng.randrange(n_orgs)
        if not p.occupation:
            p.occupation = pick(rng, OCCUPATIONS)
    films = []
    for fi in range(n_films):
        director, lead = pick(rng, directors), pick(rng, actors)
        earliest = max(persons[director].birth_year, persons[lead].birth_year) + 20
        films.append(Film(_film_title(rng, forge, cities), pick(rng, GENRES), director, lead,
                          min(LATEST_YEAR, earliest + between(rng, 0, 40))))
        persons[director].directed.append(fi)
        persons[lead].starred.append(fi)
    for pi in directors:
        persons[pi].occupation = "film director"
    for pi in actors:
        persons[pi].occupation = "actor"
    return World(countries, cities, persons, organisations, films)


def _cities(rng: random.Random, forge: NameForge, n: int, countries: list[Country]) -> list[City]:
    rivers = [forge.word(RIVER_ENDINGS) for _ in range(max(3, n // 3))]
    cities: list[City] = []
    bases: list[str] = []
    for ci in range(n):
        # The first cities give every country at least one; a few take a prefix of an earlier city's name
        # ("North Velmora") so that near-identical names compete in retrieval.
        country = ci if ci < len(countries) else rng.randrange(len(countries))
        name = ""
        if bases and rng.random() < 0.12:
            candidate = f"{pick(rng, CITY_PREFIXES)} {pick(rng, bases)}"
            if forge.claim(candidate):
                name = candidate
        if not name:
            name = forge.word(CITY_ENDINGS)
            forge.claim(f"{name} city")
            bases.append(name)
        cities.append(City(name, country, between(rng, 900, 1890), pick(rng, rivers),
                           between(rng, 8, 2400) * 500))
        countries[country].cities.append(ci)
    for country in countries:
        country.capital = pick(rng, country.cities)
    return cities


def _persons(rng: random.Random, forge: NameForge, n: int, n_cities: int) -> list[Person]:
    # Small pools make given names and surnames recur, so families and namesakes are distractors.
    givens = [forge.word(GIVEN_ENDINGS) for _ in range(max(12, n // 8))]
    surnames = [forge.word(SURNAME_ENDINGS) for _ in range(max(8, n // 2))]
    persons = []
    while len(persons) < n:
        given, surname = pick(rng, givens), pick(rng, surnames)
        if forge.claim(f"{given} {surname}"):
            persons.append(Person(given, surname, between(rng, 1905, 1985), rng.randrange(n_cities)))
    return persons


def _organisations(rng: random.Random, forge: NameForge, n: int, cities: list[City],
                   persons: list[Person], founders: list[int]) -> list[Organisation]:
    organisations = []
    for oi in range(n):
        kind, industry = pick(rng, ORG_KINDS)
        base = ""
        if rng.random() < 0.15:
            # Named after a city it need not be in: "Velmora Bank" headquartered in another city.
            city_name = pick(rng, cities).name
            if forge.claim(f"{city_name} {kind}"):
                base = city_name
        name = f"{base} {kind}"
        if not base:
            base = forge.word()
            name = f"{base} {kind}"
            forge.claim(name)
        founder = founders[oi]
        persons[founder].founded = oi
        persons[founder].employer = oi
        persons[founder].occupation = "entrepreneur"
        year = min(LATEST_YEAR, persons[founder].birth_year + between(rng, 22, 50))
        organisations.append(Organisation(name, base, industry, rng.randrange(len(cities)), year, founder))
    return organisations


def _film_title(rng: random.Random, forge: NameForge, cities: list[City]) -> str:
    while True:
        pattern = pick(rng, FILM_PATTERNS)
        if pattern == "{w}":
            return forge.word()  # a fresh word is already reserved and unique
        word = pick(rng, cities).name if rng.random() < 0.1 else forge.word()
        title = pattern.format(w=word)
        if forge.claim(title):
            return title
