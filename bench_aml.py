#!/usr/bin/env python3
"""bench_aml - measure aml against the machine's floors, on generated stores of 10 MB to 1 GB.

Every performance figure in aml's README comes from this script. It

1. generates realistic memory stores (records shaped like the Loom AML runtime's, 2-space JSON,
   gzip bytes under ``.json`` names or plain, several agents, ages over 400 days, success rates,
   tags, near-duplicates, a few inactive records), reproducibly from ``--seed``;
2. times each aml operation as a whole process (``python aml.py STORE ...``), ``--runs`` times,
   with the median, the spread and the peak memory (``ru_maxrss`` of the child);
3. measures, in the same run and on the same data, the floors: the *read floor* (inflate +
   ``json.loads`` of every data file), the *rewrite floor* (the read floor plus writing back
   the decoded bytes of the rewritten files, deflated at the file's own level over both cores
   for gzip files, fsync, rename), *inflate + sha256* of every byte (of the store, and of the
   backup repository for verify), deflate-6 of the JSON over both cores (with inflate + sha256,
   the floor of a full backup), a plain copy, interpreter start-up; and the tools a user would
   reach for instead (``tar -czf``, ``tar -xzf``, ``gzip -6``, and ``restic``/``borg`` backup,
   restore and read-all-data check when installed);
4. prints every aml figure as a ratio to its floor, to the nearest tool and to the original
   toolkit's claim (SPEC 7), with the targets of the benchmark issue marked PASS or MISS;
5. simulates ``--days`` days of backups with 1 % of records rewritten per day and reports the
   repository size next to one full snapshot and to one ``tar.gz`` per day.

Operations whose command is missing from the aml.py being measured are reported as "not
available". Results go to ``bench-results/bench-<date>.json`` and ``.md``.

Usage::

    python3 bench_aml.py --sizes 10,100 --runs 3             # the development table
    python3 bench_aml.py --sizes 10,100,1000 --runs 3 --large-runs 1 --days 30
    python3 bench_aml.py --generate-only --sizes 100 --encoding gzip

Standard library only. Sizes are MiB on disk (1 MB = 1,048,576 bytes here).
"""

import argparse
import concurrent.futures
import dataclasses
import datetime as _dt
import gzip
import hashlib
import json
import math
import os
import platform
import random
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
MB = 1024 * 1024
AGENT_LIMIT = 80 * MB
GZIP_LEVEL = 6                      # the runtime's (Node zlib default) and aml's level
NOW = _dt.datetime(2026, 11, 20, 12, 0, 0, tzinfo=_dt.timezone.utc)
NOW_TEXT = "2026-11-20T12:00:00Z"
RECORD_FILES = ("patterns.json", "solutions.json", "decisions.json")
KIND_SHARE = {"patterns.json": 0.70, "solutions.json": 0.18, "decisions.json": 0.12}


# =============================================================================
# 1. Vocabulary
# Text pools shaped like the runtime's records; phrases are combined, so the text varies
# and compresses like real notes (about 4-5x under gzip), not like a repeated template.
# =============================================================================

AGENT_NAMES = ["backend-developer", "frontend-developer", "code-reviewer", "test-automator",
               "devops-engineer", "security-auditor", "data-engineer", "mobile-developer",
               "api-designer", "database-admin", "performance-engineer", "docs-writer",
               "release-manager", "ui-designer", "ml-engineer", "site-reliability",
               "qa-lead", "architect", "accessibility-expert", "platform-engineer"]
LANGUAGES = ["typescript", "javascript", "python", "go", "sql", "yaml"]
FRAMEWORKS = ["react", "nextjs", "vue", "svelte", "angular", "express", "fastify", "nestjs",
              "django", "fastapi", "gin", "postgres", "mysql", "redis", "prisma", "typeorm",
              "sqlalchemy", "jest", "vitest", "pytest", "playwright", "cypress",
              "testing-library", "github-actions", "node"]
COMPONENTS = ["admin-panel", "audit-trail", "auth-service", "billing-service", "bundle",
              "catalog-api", "checkout-page", "contract-tests", "dashboard", "data-table",
              "e2e-suite", "events-log", "feed-api", "file-upload", "gateway", "image-pipeline",
              "inventory", "landing-page", "navbar", "notification-worker", "onboarding-wizard",
              "orders-api", "orders-table", "payment-flow", "public-api", "report-export",
              "search-endpoint", "search-indexer", "session-store", "settings-form",
              "smoke-tests", "users-table", "webhooks"]
PATTERN_TYPES = ["accessibility", "api-design", "architecture", "authentication", "caching",
                 "code-quality", "component-design", "concurrency", "data-integrity",
                 "deployment", "error-handling", "flakiness", "forms", "input-handling",
                 "integration", "migrations", "mocking", "profiling", "query-optimization",
                 "rendering", "resilience", "secrets", "state-management", "test-structure",
                 "validation"]
TECHNIQUES = ["exponential backoff with jitter", "bounded parallelism for fan-out calls",
              "centralized error middleware", "composite index matching filter and sort order",
              "compound components", "content-type sniffing and size limits on upload",
              "contract tests for external APIs", "controlled forms with schema resolver",
              "cursor-based pagination", "database constraints over application checks",
              "deterministic clocks in tests", "early returns over nested conditionals",
              "ephemeral databases per test run", "expand and contract migrations",
              "feature flags for risky rollouts", "focus management on route change",
              "idempotency keys on POST handlers", "outbox table for domain events",
              "parameterized queries only", "risk-based review focus",
              "role-based locators in e2e tests", "schema validation at the boundary",
              "secrets from the environment validated at boot", "test data builders",
              "blue-green deploys with health-gated cutover", "request-scoped dataloaders"]
TECHNIQUE_TAILS = ["", "", "", " with p-limit", " with typed error classes",
                   " with request correlation ids", " with pre-signed URLs", " with pact",
                   " generated from the OpenAPI spec", " with automatic rollback",
                   " partial index for active rows", " with INCLUDE columns",
                   " injecting a Clock interface", " with recorded fixtures",
                   " with worker pools", " with field-level async validation"]
RATIONALES = ["A single error boundary keeps HTTP status mapping consistent and stops stack "
              "traces from leaking to clients",
              "An index that covers both WHERE and ORDER BY avoids a sort step and heap fetches",
              "Boolean parameters hide meaning at call sites and multiply when new states appear",
              "Constraints enforce invariants even for scripts and concurrent writers that "
              "bypass the app",
              "Flattening control flow makes the happy path obvious and reduces review time",
              "Hand-written mocks drift from the real provider; contracts catch breaking "
              "changes early",
              "Offset pagination degrades on large tables and produces duplicates when rows "
              "are inserted between page requests",
              "Selectors tied to accessible roles break less often than CSS selectors and "
              "double as a11y checks",
              "Screen reader users otherwise lose their place after client-side navigation",
              "Sharing the validation schema between client and server keeps error messages "
              "consistent",
              "String-built SQL is the most common injection vector found in review",
              "Synchronized retries amplify outages; jitter spreads load and a cap keeps "
              "latency bounded",
              "Trusting client-provided MIME types allows stored XSS and oversized uploads "
              "exhaust disk",
              "Validating input once at the edge removes defensive checks deeper in the code "
              "and gives precise 400 errors",
              "Unbounded fan-out exhausts connection pools and turns one slow dependency into "
              "an outage",
              "Tests that share a database leak state between runs and fail in random order",
              "Renaming a column in one step breaks the running version during deploys",
              "Events written in the same transaction as the state change are never lost"]
RATIONALE_TAILS = ["", "", "; it also made the code easier to review",
                   " and keeps behaviour predictable across environments",
                   "; measured improvement was visible in the next sprint",
                   "; the team agreed to make it the default",
                   "; this cut follow-up bug reports noticeably"]
CODE_TEMPLATES = [
    "CREATE INDEX CONCURRENTLY idx_orders_user_created ON orders (user_id, created_at DESC);",
    "app.use((err, req, res, _next) => { const e = toAppError(err); "
    "res.status(e.status).json(e.toProblem(req.id)); });",
    "const delay = Math.min(cap, base * 2 ** attempt) * Math.random();",
    "const order = anOrder().withStatus(\"paid\").build();",
    "const rows = await db.query(`SELECT * FROM ${table} WHERE id > $1 ORDER BY id LIMIT $2`, "
    "[cursor, limit + 1]);"]
STEPS = ["Add NOT NULL, UNIQUE and FK constraints", "Add new column nullable",
         "Advance time explicitly", "Announce the page title in a polite live region",
         "Assert query count in tests", "Ban nth-child selectors in lint",
         "Ban template literals in query calls", "Batch lookups by key", "Cap request body size",
         "Capture a flame graph", "Classify changed files by risk", "Classify retryable errors",
         "Compute delay = min(cap, base * 2^attempt) * random()",
         "Consumers deduplicate by event id", "Create a builder per aggregate",
         "Create index on (filter cols, sort col)", "Declare request schemas next to the route",
         "Define an AppError hierarchy with status codes", "Deploy to the idle color",
         "Register the error middleware last", "Stop after the retry budget is exhausted",
         "Relay publishes and marks rows as sent", "Map violations to domain errors",
         "Log with the request id and return a problem+json body",
         "Set max-age and stale-while-revalidate", "Validate presence and format at boot",
         "Fall back to test ids for non-semantic nodes", "Backfill in batches of 10k rows",
         "Drop the old column after two releases", "Run EXPLAIN ANALYZE on the slow query"]
WHEN = ["APIs with two or more boolean flags", "CPU-bound latency regressions", "CRUD dashboards",
        "GraphQL resolvers", "ORM-backed list endpoints", "REST services with many routes",
        "SPAs with client routing", "any SQL access", "batch jobs calling external APIs",
        "calls to third-party APIs", "core business tables", "hot list queries",
        "message consumers", "multi-step forms", "payment and order creation",
        "public endpoints", "queue consumers", "read-heavy catalog pages",
        "renaming or retyping columns in production", "service-to-service calls",
        "services emitting domain events", "tables with more than a few hundred rows",
        "webhook receivers", "user avatar and document uploads"]
WHEN_NOT = ["I/O bound waits", "append-only analytics events", "balances and inventory counts",
            "canvas-based UIs", "fire-and-forget analytics", "greenfield schemas",
            "internal hot loops", "local scripts", "non-idempotent operations without keys",
            "print views", "pure functions", "pure unit tests", "server-to-server mTLS",
            "short lists", "single-function lambdas", "single-record fetches",
            "small static lookup tables", "tiny widgets", "trivial value objects"]
TAGS = ["a11y", "api", "auth", "caching", "concurrency", "config", "database", "deploy",
        "e2e", "errors", "events", "fixtures", "flaky-tests", "forms", "indexing", "latency",
        "middleware", "migrations", "orm", "pagination", "payments", "performance", "postgres",
        "python", "react", "readability", "reliability", "retries", "review", "security",
        "sql", "state", "testing", "types", "typescript", "validation", "zero-downtime"]
ERRORS = [("TypeError", "Cannot read properties of undefined (reading '%s')"),
          ("TypeError", "Cannot destructure property '%s' of 'undefined'"),
          ("QueryFailedError", "column \"%s\" does not exist"),
          ("SlowQuery", "query on %s took 4650ms (threshold 500ms)"),
          ("SecurityVulnerability", "Path traversal via filename \"%s\""),
          ("SecurityVulnerability", "Reflected XSS in %s query parameter"),
          ("AssertionError", "expected element '%s' to be visible"),
          ("LintError", "'%s' is assigned a value but never used"),
          ("ECONNREFUSED", "Redis connection to localhost:6379 failed"),
          ("ETIMEDOUT", "Socket timed out calling partner API after 30000ms"),
          ("OOMKilled", "JavaScript heap out of memory"),
          ("HydrationMismatch", "Hydration failed because the initial UI does not match"),
          ("UnhandledPromiseRejection", "Promises must be awaited (no-floating-promises)")]
ERROR_WORDS = ["id", "email", "price", "map", "then", "config", "length", "orders", "token",
               "avatar_url", "invoice", "userId", "items", "total"]
ROOT_CAUSES = ["API response shape changed after upstream deploy",
               "Animation not finished before assertion",
               "Async initialization raced the first request", "Concurrent inserts without upsert",
               "Connection pool exhausted under load",
               "Date formatted with client locale during render",
               "Filename joined into path without normalization",
               "Function call on indexed column disables index use",
               "JWT library default allowed none algorithm", "Leftover debug variable",
               "Migration not applied in this environment", "Missing index on filter column",
               "No client timeout and slow partner API",
               "Optional relation not loaded before access",
               "Selector changed after UI refactor", "Shared fixture mutated by previous test",
               "Transactions lock rows in different order", "Unbounded in-process cache",
               "User input rendered without escaping", "Whole export loaded into memory"]
FIXES = ["Add LRU bound to cache", "Add composite index concurrently",
         "Add readiness wait with retries on startup", "Await the init promise in the request path",
         "Deep clone fixtures per test", "Escape output and set CSP",
         "Format dates on the server or after mount",
         "Guard with optional chaining and load the relation explicitly",
         "Increase pool size and add bounded concurrency",
         "Lock rows in consistent primary key order", "Mock the HTTP client at module boundary",
         "Pin allowed algorithms explicitly",
         "Resolve and verify the path stays inside the upload dir",
         "Rewrite predicate to be sargable", "Run pending migrations in deploy step",
         "Set explicit timeouts and retry with backoff", "Stream rows and write incrementally",
         "Switch to role-based locator", "Use INSERT ... ON CONFLICT DO NOTHING",
         "Validate upstream response with a schema before use"]
PREVENTIONS = ["Add contract test for upstream payload", "Alert on RSS growth",
               "Ban fixed sleeps in e2e", "Concurrency test for create endpoints",
               "EXPLAIN in PR template for new queries",
               "Enable strictNullChecks and validate external data",
               "Fail fast with clear config error", "Fail tests on unexpected network access",
               "Memory profiling in load tests", "Migration check in CI", "Pre-commit lint hook",
               "Run tests in random order", "SSR snapshot tests",
               "Security lint rules and SAST in CI", "Timeout budgets per dependency"]
CODE_FIXES = ["INSERT INTO %s (...) VALUES (...) ON CONFLICT (id) DO NOTHING;",
              "const value = order.customer?.%s ?? defaultValue;"]
ENVIRONMENTS = ["production", "staging", "ci", "local"]
SOLUTION_TAGS = ["async", "ci", "concurrency", "database", "deploy", "docker", "flaky-tests",
                 "lint", "memory", "network", "null-safety", "performance", "production",
                 "runtime-error", "security", "ssr", "staging", "startup", "timeouts"]
SUBJECTS = ["billing", "file exports", "the admin dashboard", "the order history", "search",
            "feature flags", "audit events", "the public API", "user sessions",
            "the product catalog", "analytics events", "notifications"]
QUESTIONS = ["Session cookies or JWT for %s?", "REST or GraphQL for %s?",
             "Should %s be split out of the monolith?", "How should clients consume %s?",
             "How should %s manage client state?", "Build or buy authentication for %s?",
             "Which e2e framework should we adopt for %s?", "What test pyramid shape fits %s?",
             "Should we enforce %s via lint or review?", "Which cache fits %s?"]
DECISION_TYPES = ["api-style", "architecture", "auth", "caching", "code-standards", "database",
                  "deployment", "documentation", "state-management", "testing-strategy"]
OPTIONS = ["CDN", "PaaS", "REST", "async via queue", "custom JWT", "cypress", "gRPC",
           "heavy unit tests with few e2e", "in-process LRU", "keep in monolith module",
           "lint rule", "managed identity provider", "mostly integration tests", "mysql",
           "playwright", "react-query + local state", "redis", "review checklist",
           "separate service", "server sessions", "tRPC", "zustand"]
FACTORS = ["caching at the edge", "client diversity", "compliance", "consistency",
           "deployment independence", "failure isolation", "feedback speed", "flakiness",
           "query flexibility", "review load", "security posture", "team boundaries",
           "time to market", "transactional integrity", "type safety"]
SECONDARY = ["CI cost", "community", "debuggability", "hosting cost", "learning curve",
             "migration effort", "operational overhead", "pricing at scale",
             "tooling maturity", "vendor lock-in"]
DECISION_RATIONALES = ["Automation frees reviewers for design issues",
                       "Cross-browser support was required", "Data changes rarely and is public",
                       "End-to-end types remove a class of integration bugs",
                       "HTTP caching and simple tooling outweighed query flexibility",
                       "Integration tests gave best signal per minute of CI",
                       "Module boundary first, extraction later if needed",
                       "Queue decouples the slow consumer from checkout",
                       "Server sessions are simpler to revoke",
                       "Traffic is spiky and mostly idle"]
LESSONS = ["Autofix made adoption painless", "Cache stampede on deploy needed locking",
           "Connection pooling was needed earlier than expected",
           "Dead letter queue needed monitoring", "N+1 issues appeared in resolvers quickly",
           "Parallel shards needed isolated data", "Query keys need a naming convention",
           "Shared database made extraction harder", "TTL too long for price changes",
           "Token refresh edge cases took longest", "Trace viewer cut debugging time in half",
           "Versioning policy should have been written down on day one"]
IMPROVEMENTS = ["Add cache warming job", "Add docs preview per PR", "Add persisted queries",
                "Add step-up auth for payouts", "Colocate state with features",
                "Define ownership per module", "Quarantine lane for flaky tests"]
DECISION_TAGS = ["api", "architecture", "auth", "backend", "caching", "database", "devops",
                 "docs", "frontend", "performance", "security", "services", "standards",
                 "state", "testing"]


# =============================================================================
# 2. Record rendering
# Records are rendered straight to the runtime's 2-space JSON text (json.dumps with an
# indent runs the pure-Python encoder, about 10x slower); tests parse every record back.
# =============================================================================

# Strings only: the C encoder json.dumps uses, without its per-call overhead (same escaping).
_Q = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def iso_ms(epoch_ms: int) -> str:
    """The runtime's timestamp form for an epoch in milliseconds: 2026-11-20T12:00:00.000Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_ms // 1000)) + \
        ".%03dZ" % (epoch_ms % 1000)


def _strings(items: Sequence[str], pad: str) -> str:
    """A JSON array of strings in the runtime's indentation (``[]`` when empty)."""
    if not items:
        return "[]"
    lead = pad + "  "
    inner = ",\n".join([lead + _Q(s) for s in items])
    return "[\n" + inner + "\n" + pad + "]"


def _obj(fields: Sequence[Tuple[str, str]], pad: str) -> str:
    """A JSON object from pre-rendered values, indented under ``pad`` (keys are plain ASCII)."""
    if not fields:
        return "{}"
    lead = pad + '  "'
    inner = ",\n".join(lead + k + '": ' + v for k, v in fields)
    return "{\n" + inner + "\n" + pad + "}"


def _num(value: float) -> str:
    """A JSON number as JSON.stringify writes it (integral floats without ``.0``)."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _uuid(rng: random.Random) -> str:
    h = "%032x" % rng.getrandbits(128)
    return "%s-%s-4%s-%s%s-%s" % (h[:8], h[8:12], h[13:16], "89ab"[int(h[16], 16) & 3],
                                  h[17:20], h[20:32])


def _render(fields: Sequence[Tuple[str, str]]) -> str:
    """One record as an element of the top-level array (2-space indent)."""
    return "  " + _obj(fields, "  ")


@dataclasses.dataclass
class Clock:
    """Ages of a record: creation and last use, in epoch milliseconds before NOW."""
    now_ms: int

    def age(self, rng: random.Random) -> int:
        """Days since creation: most records recent, a tail past 400 days."""
        roll = rng.random()
        if roll < 0.55:
            return rng.randint(0, 120)
        if roll < 0.90:
            return rng.randint(121, 400)
        return rng.randint(401, 540)

    def at(self, days_ago: float, rng: random.Random) -> int:
        """Epoch ms of a moment ``days_ago`` before NOW, at a random time of that day."""
        return self.now_ms - int(days_ago * 86400000) - rng.randint(0, 86399999)


def _context(rng: random.Random) -> List[Tuple[str, str]]:
    fields = [("language", _Q(rng.choice(LANGUAGES))), ("framework", _Q(rng.choice(FRAMEWORKS))),
              ("component", _Q(rng.choice(COMPONENTS))),
              ("scale", _Q(rng.choice(("small", "medium", "large"))))]
    if rng.random() < 0.4:
        fields.append(("monorepo", "true" if rng.random() < 0.5 else "false"))
    fields.append(("teamSize", str(rng.randint(2, 12))))
    return fields


def _measured(rng: random.Random) -> str:
    """What agents write down about an observed effect: numbers, files and tickets vary."""
    roll = rng.random()
    if roll < 0.35:
        before = rng.randint(120, 4000)
        return "; p95 went from %d ms to %d ms over %d runs" % (
            before, rng.randint(20, before), rng.randint(5, 900))
    if roll < 0.6:
        return " (seen in src/%s/%s.ts:%d, %s-%d)" % (
            rng.choice(COMPONENTS), rng.choice(ERROR_WORDS), rng.randint(1, 1800),
            rng.choice(("ENG", "OPS", "WEB", "API")), rng.randint(100, 9999))
    return ""


def _same(body: Dict[str, Any], key: str, value: Any) -> Any:
    """``value`` for a new record's content; a near-duplicate's copy of the body already holds
    its original's, so the copy keeps every number, state and outcome (the random draw is
    made either way: the stream, and so every other record, stays as it was)."""
    return body.setdefault("_same_" + key, value)


def pattern_body(rng: random.Random) -> Dict[str, Any]:
    """The textual content of a pattern (what near-duplicates share)."""
    framework = rng.choice(FRAMEWORKS)
    steps = rng.sample(STEPS, rng.randint(2, 4))
    if rng.random() < 0.3:
        steps.append("Document the %s specifics in the team wiki" % framework)
    return {"type": rng.choice(PATTERN_TYPES),
            "context": _context(rng),
            "technique": rng.choice(TECHNIQUES) + rng.choice(TECHNIQUE_TAILS),
            "code": rng.choice(CODE_TEMPLATES) if rng.random() < 0.35 else None,
            "rationale": rng.choice(RATIONALES) + rng.choice(RATIONALE_TAILS) + _measured(rng),
            "steps": steps,
            "when": rng.sample(WHEN, rng.randint(1, 3)) + ["%s projects" % framework],
            "not": rng.sample(WHEN_NOT, rng.randint(1, 2)),
            "tags": rng.sample(TAGS, rng.randint(2, 4))}


def render_pattern(rng: random.Random, agent: str, clock: Clock, body: Dict[str, Any]) -> str:
    """A pattern record with fresh id, ages and metrics around ``body``."""
    age = clock.age(rng)
    idle = min(age, rng.expovariate(1 / 25.0) if rng.random() < 0.9 else rng.uniform(0, age))
    created = clock.at(age, rng)
    last_used = max(created, clock.at(idle, rng))
    quality = rng.random()
    rate = _same(body, "rate", rng.uniform(0.6, 0.98) if quality < 0.7 else
                 rng.uniform(0.3, 0.6) if quality < 0.9 else rng.uniform(0.0, 0.25))
    runs = int(rng.expovariate(1 / 40.0))
    wins = int(round(rate * runs))
    confidence = min(0.99, 0.1 + (wins / runs if runs else 0.5) * 0.9 * (1 - math.exp(-runs / 15)))
    approach = [("technique", _Q(body["technique"]))]
    if body["code"]:
        approach.append(("codeTemplate", _Q(body["code"])))
    approach += [("rationale", _Q(body["rationale"])),
                 ("steps", _strings(body["steps"], "        "))]
    pattern = [("type", _Q(body["type"])), ("context", _obj(body["context"], "      ")),
               ("approach", _obj(approach, "      ")),
               ("conditions", _obj([("whenApplicable", _strings(body["when"], "        ")),
                                    ("whenNotApplicable", _strings(body["not"], "        "))],
                                   "      "))]
    metrics = [("successRate", _num(wins / runs) if runs else "0"),
               ("executionCount", str(runs)),
               ("avgTimeSavedMs", _num(round(rng.uniform(500, 200000), 2))),
               ("errorPreventionCount", str(int(rng.expovariate(1 / 3.0))))]
    evolution = [("created", _Q(iso_ms(created))), ("lastUsed", _Q(iso_ms(last_used))),
                 ("refinements", str(max(0, runs - 1))), ("confidenceScore", _num(confidence))]
    return _render([("id", _Q(_uuid(rng))), ("agent", _Q(agent)),
                    ("timestamp", _Q(iso_ms(created))),
                    ("pattern", _obj(pattern, "    ")), ("metrics", _obj(metrics, "    ")),
                    ("evolution", _obj(evolution, "    ")),
                    ("tags", _strings(body["tags"], "    ")),
                    ("active", _same(body, "active", "false" if rng.random() < 0.03
                                     else "true"))])


def solution_body(rng: random.Random) -> Dict[str, Any]:
    """The textual content of a solution."""
    etype, message = rng.choice(ERRORS)
    word = rng.choice(ERROR_WORDS)
    message = message % word if "%s" in message else message
    if rng.random() < 0.5:
        message += " at %s (src/%s/%s.ts:%d:%d)" % (
            rng.choice(("handler", "render", "resolve", "next", "process")), rng.choice(COMPONENTS),
            rng.choice(ERROR_WORDS), rng.randint(1, 900), rng.randint(1, 80))
    return {"etype": etype, "message": message,
            "env": rng.choice(ENVIRONMENTS), "context": _context(rng)[:3],
            "cause": rng.choice(ROOT_CAUSES), "fix": rng.choice(FIXES),
            "code": rng.choice(CODE_FIXES) % word if rng.random() < 0.3 else None,
            "prevention": rng.choice(PREVENTIONS),
            "tags": rng.sample(SOLUTION_TAGS, rng.randint(1, 3))}


def render_solution(rng: random.Random, agent: str, clock: Clock, body: Dict[str, Any]) -> str:
    """A solution record."""
    created = clock.at(clock.age(rng), rng)
    problem = [("errorType", _Q(body["etype"])), ("errorMessage", _Q(body["message"])),
               ("stackTraceHash", _Q("%016x" % rng.getrandbits(64))),
               ("context", _obj(body["context"] + [("environment", _Q(body["env"]))], "      "))]
    solution = [("rootCause", _Q(body["cause"])), ("fixApproach", _Q(body["fix"]))]
    if body["code"]:
        solution.append(("codeFix", _Q(body["code"])))
    solution.append(("prevention", _Q(body["prevention"])))
    if rng.random() < 0.4:
        solution.append(("relatedPatterns", _strings(
            [_uuid(rng) for _ in range(rng.randint(1, 2))], "      ")))
    effect = [("worked", _same(body, "worked", "true" if rng.random() < 0.85 else "false")),
              ("timeToFixMinutes", str(rng.randint(3, 240))),
              ("preventedRecurrence", str(rng.randint(0, 9))),
              ("relatedErrorsFixed", str(rng.randint(0, 4)))]
    return _render([("id", _Q(_uuid(rng))), ("agent", _Q(agent)),
                    ("timestamp", _Q(iso_ms(created))),
                    ("problem", _obj(problem, "    ")), ("solution", _obj(solution, "    ")),
                    ("effectiveness", _obj(effect, "    ")),
                    ("tags", _strings(body["tags"], "    ")),
                    ("active", _same(body, "active", "false" if rng.random() < 0.03
                                     else "true")),
                    ("verifiedCount", str(rng.randint(0, 12)))])


def decision_body(rng: random.Random) -> Dict[str, Any]:
    """The textual content of a decision."""
    return {"type": rng.choice(DECISION_TYPES),
            "question": rng.choice(QUESTIONS) % rng.choice(SUBJECTS),
            "component": rng.choice(COMPONENTS), "option": rng.choice(OPTIONS),
            "alternatives": rng.sample(OPTIONS, rng.randint(1, 3)),
            "primary": rng.sample(FACTORS, rng.randint(1, 3)),
            "secondary": rng.sample(SECONDARY, rng.randint(0, 2)),
            "rationale": rng.choice(DECISION_RATIONALES) if rng.random() < 0.6 else None,
            "tags": rng.sample(DECISION_TAGS, rng.randint(1, 3))}


def _outcome(rng: random.Random) -> str:
    metrics = []
    if rng.random() < 0.5:
        metrics.append(("developmentSpeed", _num(round(rng.uniform(0.2, 2.0), 3))))
    if rng.random() < 0.6:
        metrics.append(("maintainability", _num(round(rng.random(), 3))))
    if rng.random() < 0.3:
        metrics.append(("customMetrics", _obj([("incidentsPerMonth", str(rng.randint(0, 9)))],
                                              "        ")))
    fields = [("successMetrics", _obj(metrics, "      ")),
              ("lessonsLearned", _strings(rng.sample(LESSONS, rng.randint(1, 2)), "      ")),
              ("wouldRepeat", "true" if rng.random() < 0.85 else "false")]
    if rng.random() < 0.5:
        fields.append(("improvements", _strings(rng.sample(IMPROVEMENTS, 1), "      ")))
    return _obj(fields, "    ")


def render_decision(rng: random.Random, agent: str, clock: Clock, body: Dict[str, Any]) -> str:
    """A decision record (three in four with an outcome; the key is absent otherwise)."""
    created = clock.at(clock.age(rng), rng)
    context = [("component", _Q(body["component"])),
               ("scale", _Q(rng.choice(("prototype", "small", "medium", "large")))),
               ("teamSize", str(rng.randint(2, 12))),
               ("greenfield", "true" if rng.random() < 0.3 else "false"),
               ("ticket", _Q("%s-%d" % (rng.choice(("ENG", "ARCH", "PLAT")),
                                        rng.randint(10, 9999))))]
    context = _same(body, "context", context)
    decision = [("type", _Q(body["type"])), ("question", _Q(body["question"])),
                ("context", _obj(context, "      ")), ("chosenOption", _Q(body["option"])),
                ("alternativesConsidered", _strings(body["alternatives"], "      ")),
                ("decisionFactors", _obj([("primary", _strings(body["primary"], "        ")),
                                          ("secondary", _strings(body["secondary"], "        "))],
                                         "      "))]
    if body["rationale"]:
        decision.append(("rationale", _Q(body["rationale"])))
    fields = [("id", _Q(_uuid(rng))), ("agent", _Q(agent)), ("timestamp", _Q(iso_ms(created))),
              ("decision", _obj(decision, "    "))]
    outcome = _same(body, "outcome", _outcome(rng) if rng.random() < 0.75 else None)
    if outcome:
        fields.append(("outcome", outcome))
    fields += [("tags", _strings(body["tags"], "    ")),
               ("active", _same(body, "active", "false" if rng.random() < 0.03 else "true"))]
    if rng.random() < 0.4:
        fields.append(("reviewedAt", _Q(iso_ms(min(clock.now_ms, created + rng.randint(
            86400000, 120 * 86400000))))))
    return _render(fields)


KINDS = {"patterns.json": (pattern_body, render_pattern),
         "solutions.json": (solution_body, render_solution),
         "decisions.json": (decision_body, render_decision)}


def _near_duplicate(body: Dict[str, Any], rng: random.Random) -> Dict[str, Any]:
    """A copy of a recent record's content with one small wording change, as agents relearn:
    same content under a new id (its numbers, versions, paths, error codes, state and outcome
    are its original's, see _same; ages and evidence counts are its own)."""
    twin = dict(body)
    for key in ("rationale", "technique", "fix", "question"):
        if twin.get(key):
            twin[key] = twin[key] + rng.choice((".", " (again)", " for this team", "!"))
            break
    return twin


# =============================================================================
# 3. Store generation
# One task per agent, run in parallel processes; each task's output depends only on
# (seed, agent index), so the store is the same whatever --jobs is.
# =============================================================================

@dataclasses.dataclass
class AgentPlan:
    """What one generator task writes."""
    root: str
    agent: str
    index: int
    budget: int          # bytes on disk for the three record files
    gzip: bool
    seed: int
    dup_rate: float = 0.05
    exact_dup_rate: float = 0.001


def agent_count(size_mb: float) -> int:
    """More agents for bigger stores, each well under the 80 MiB agent limit."""
    by_growth = int(round(3 * size_mb ** 0.25))
    by_limit = int(math.ceil(size_mb * MB * 1.4 / (AGENT_LIMIT * 0.95)))
    return max(3, by_growth, by_limit)


def plan_store(root: Path, size_mb: float, seed: int, encoding: str,
               agents: Optional[int] = None) -> List[AgentPlan]:
    """Split the byte budget over agents (uneven, as real agents are) and choose encodings."""
    rng = random.Random("plan-%d" % seed)
    count = agents or agent_count(size_mb)
    weights = [rng.uniform(0.6, 1.4) for _ in range(count)]
    total = size_mb * MB * 0.995  # config, metrics and context files take the rest
    plans = []
    for i, w in enumerate(weights):
        name = AGENT_NAMES[i % len(AGENT_NAMES)] + ("" if i < len(AGENT_NAMES)
                                                    else "-%d" % (i // len(AGENT_NAMES) + 1))
        zipped = encoding == "gzip" or (encoding == "mixed" and i % 2 == 0)
        budget = min(int(total * w / sum(weights)), int(AGENT_LIMIT * 0.95))
        plans.append(AgentPlan(str(root), name, i, budget, zipped, seed))
    return plans


class _Sink:
    """Collects a file's bytes, estimating what lands on disk (compressed size for gzip)."""

    def __init__(self, zipped: bool):
        self.parts: List[bytes] = []
        self.raw = 0                # JSON bytes fed
        self.out = 0                # bytes emitted
        self.raw_at_out = 0         # JSON bytes fed when output last appeared
        self.zip = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31) if zipped else None

    def add(self, text: str) -> None:
        """Append text (compressing it for a gzip file)."""
        data = text.encode("utf-8")
        self.raw += len(data)
        chunk = self.zip.compress(data) if self.zip else data
        if chunk:
            self.parts.append(chunk)
            self.out += len(chunk)
            self.raw_at_out = self.raw

    def size(self) -> int:
        """Bytes on disk so far; zlib holds input back, so the pending part is estimated."""
        if not self.zip:
            return self.out
        ratio = self.out / self.raw_at_out if self.raw_at_out > (1 << 16) else 0.13
        return self.out + int((self.raw - self.raw_at_out) * ratio)

    def finish(self) -> bytes:
        """The whole file's bytes."""
        if self.zip:
            self.parts.append(self.zip.flush())
        return b"".join(self.parts)


def generate_records(kind: str, agent: str, budget: int, zipped: bool, rng: random.Random,
                     dup_rate: float = 0.05, exact_dup_rate: float = 0.001
                     ) -> Tuple[bytes, List[str], int, int]:
    """One record file (JSON array) of about ``budget`` bytes on disk.

    Returns (file bytes, distinct ids, record count including exact duplicates, JSON bytes)."""
    make_body, render = KINDS[kind]
    clock = Clock(int(NOW.timestamp() * 1000))
    sink, ids, recent, last = _Sink(zipped), [], [], None
    count = 0
    sink.add("[\n")
    while sink.size() < budget or not ids:
        roll = rng.random()
        if last is not None and roll < exact_dup_rate:
            text = last                                   # an exact duplicate, same id
        else:
            if recent and roll < dup_rate:
                body = _near_duplicate(rng.choice(recent), rng)
            else:
                body = make_body(rng)
                recent = (recent + [body])[-32:]
            text = render(rng, agent, clock, body)
            ids.append(text[15:51])                       # '  {\n    "id": "' is 15 chars
        count += 1
        sink.add((",\n" if last is not None else "") + text)
        last = text
    sink.add("\n]")
    return sink.finish(), ids, count, sink.raw


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(".%s.bench-tmp" % path.name)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _encode(obj: Any, zipped: bool) -> bytes:
    data = json.dumps(obj, indent=2).encode("utf-8")
    return gzip.compress(data, GZIP_LEVEL, mtime=0) if zipped else data


def generate_agent(plan: AgentPlan) -> Dict[str, Any]:
    """Write one agent's files; returns counts and a few ids for lookups."""
    folder = Path(plan.root) / plan.agent
    folder.mkdir(parents=True, exist_ok=True)
    summary: Dict[str, Any] = {"agent": plan.agent, "gzip": plan.gzip, "files": {}}
    for kind in RECORD_FILES:
        rng = random.Random("%d-%d-%s" % (plan.seed, plan.index, kind))
        budget = int(plan.budget * KIND_SHARE[kind])
        data, ids, count, raw = generate_records(kind, plan.agent, budget, plan.gzip, rng,
                                                 plan.dup_rate, plan.exact_dup_rate)
        _write_atomic(folder / kind, data)
        summary["files"][kind] = {"records": count, "bytes": len(data), "raw": raw,
                                  "sample_ids": [ids[len(ids) // 2], ids[-1]]}
    _write_agent_extras(folder, plan, summary)
    _age_mtimes(folder, plan.seed, plan.index)
    return summary


def _write_agent_extras(folder: Path, plan: AgentPlan, summary: Dict[str, Any]) -> None:
    rng = random.Random("%d-%d-extras" % (plan.seed, plan.index))
    counts = {k: v["records"] for k, v in summary["files"].items()}
    metrics = {"agent": plan.agent, "timestamp": iso_ms(int(NOW.timestamp() * 1000)),
               "performance": {"avgQueryLatencyMs": round(rng.uniform(5, 40), 2),
                               "cacheHitRate": round(rng.random(), 3),
                               "totalQueries": rng.randint(1000, 90000)},
               "learning": {"totalPatterns": counts["patterns.json"],
                            "totalSolutions": counts["solutions.json"],
                            "totalDecisions": counts["decisions.json"]},
               "storage": {"totalSizeBytes": sum(v["bytes"] for v in summary["files"].values())},
               "period": "daily"}
    context = {"project": rng.choice(["acme-storefront", "northwind-portal", "orbit-mobile-api"]),
               "agent": plan.agent, "techStack": {"languages": rng.sample(LANGUAGES, 2),
                                                  "frameworks": rng.sample(FRAMEWORKS, 3)},
               "lastSession": iso_ms(int(NOW.timestamp() * 1000) - rng.randint(0, 86400000)),
               "sessionCount": rng.randint(10, 900)}
    _write_atomic(folder / "metrics.json", _encode(metrics, plan.gzip))
    _write_atomic(folder / "context.json", _encode(context, plan.gzip))


def _age_mtimes(folder: Path, seed: int, index: int) -> None:
    """File times as the runtime leaves them: last written within the last days before NOW."""
    rng = random.Random("%d-%d-mtime" % (seed, index))
    for path in folder.iterdir():
        moment = NOW.timestamp() - rng.uniform(0, 10 * 86400)
        os.utime(path, (moment, moment))


RUNTIME_CONFIG = {"version": "1.0.0", "enabled": True,
                  "storage": {"backend": "filesystem", "path": ".loom/memory",
                              "compression": True, "maxSizeGb": 1, "backupEnabled": True,
                              "backupPath": ".loom/memory-backup", "backupSchedule": "daily"},
                  "pruning": {"enabled": True, "schedule": "daily", "maxAgeDays": 90,
                              "minConfidence": 0.2, "minUsageRate": 0.1,
                              "aggressiveMode": False},
                  "performance": {"cacheEnabled": True, "cacheMaxSizeMb": 100,
                                  "indexingEnabled": True}}


def generate_store(root: Path, size_mb: float, seed: int = 1, encoding: str = "mixed",
                   jobs: int = 1, agents: Optional[int] = None) -> Dict[str, Any]:
    """Generate a store of about ``size_mb`` MiB under ``root``; returns its description."""
    if encoding not in ("gzip", "plain", "mixed"):
        raise ValueError("encoding must be gzip, plain or mixed")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    plans = plan_store(root, size_mb, seed, encoding, agents)
    started = time.perf_counter()
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
            summaries = list(pool.map(generate_agent, plans))
    else:
        summaries = [generate_agent(p) for p in plans]
    config = dict(RUNTIME_CONFIG, agentOverrides={p.agent: {"agent": p.agent, "enabled": True}
                                                  for p in plans})
    _write_atomic(root / "config.json", json.dumps(config, indent=2).encode("utf-8"))
    (root / "global").mkdir(exist_ok=True)
    _write_atomic(root / "global" / "shared-knowledge.json",
                  json.dumps({"conventions": ["conventional commits"], "updated": iso_ms(
                      int(NOW.timestamp() * 1000))}, indent=2).encode("utf-8"))
    return {"root": str(root), "size_mb": size_mb, "seed": seed, "encoding": encoding,
            "agents": summaries, "bytes": tree_bytes(root),
            "records": sum(f["records"] for s in summaries for f in s["files"].values()),
            "json_bytes": sum(f["raw"] for s in summaries for f in s["files"].values()),
            "largest_file_raw": max(f["raw"] for s in summaries for f in s["files"].values()),
            "generate_seconds": round(time.perf_counter() - started, 3)}


def tree_bytes(root: Path) -> int:
    """Apparent size of every file under root."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


# =============================================================================
# 4. Store changes as the runtime makes them
# The runtime rewrites a whole agent file (one gzip stream for gzip files) whenever one
# record changes; the 1 % change and the simulated days do the same.
# =============================================================================

_SEP = "\n  },\n  {"


def _read_text(path: Path) -> Tuple[str, bool]:
    raw = path.read_bytes()
    zipped = raw[:2] == b"\x1f\x8b"
    return (gzip.decompress(raw) if zipped else raw).decode("utf-8"), zipped


def _touch_record(rec: Dict[str, Any], kind: str, now_text: str, rng: random.Random) -> None:
    """One use of a record, as the runtime's learning loop records it."""
    if kind == "patterns.json" and isinstance(rec.get("metrics"), dict):
        m, ev = rec["metrics"], rec.setdefault("evolution", {})
        runs = int(m.get("executionCount") or 0)
        win = 1 if rng.random() < float(m.get("successRate") or 0.5) else 0
        m["successRate"] = (float(m.get("successRate") or 0) * runs + win) / (runs + 1)
        m["executionCount"] = runs + 1
        ev["lastUsed"] = now_text
        ev["refinements"] = int(ev.get("refinements") or 0) + 1
    elif kind == "solutions.json":
        rec["verifiedCount"] = int(rec.get("verifiedCount") or 0) + 1
    else:
        rec["reviewedAt"] = now_text


def _splice(text: str, records: List[Any], changed: Dict[int, Any]) -> str:
    """The file text with only the changed records re-rendered (same layout as json.dumps)."""
    head, tail = "[\n  {", "\n  }\n]"
    body = text.rstrip("\n")
    pieces = body[len(head):-len(tail)].split(_SEP) if body.startswith(head) and \
        body.endswith(tail) else []
    if len(pieces) != len(records):
        return json.dumps(records, indent=2, ensure_ascii=False)
    for i, rec in changed.items():
        rendered = "  " + json.dumps(rec, indent=2, ensure_ascii=False).replace("\n", "\n  ")
        pieces[i] = rendered[len("  {"):-len("\n  }")]
    return head + _SEP.join(pieces) + tail


def mutate_file(job: Tuple[str, float, int, str]) -> int:
    """Change ``fraction`` of the records of one file (random rounding); returns how many."""
    path, fraction, seed, now_text = Path(job[0]), job[1], job[2], job[3]
    rng = random.Random("%d-%s" % (seed, path))
    text, zipped = _read_text(path)
    records = json.loads(text)
    count = int(len(records) * fraction + rng.random())
    if not isinstance(records, list) or count == 0:
        return 0
    changed = {}
    for i in rng.sample(range(len(records)), min(count, len(records))):
        _touch_record(records[i], path.name, now_text, rng)
        changed[i] = records[i]
    data = _splice(text, records, changed).encode("utf-8")
    _write_atomic(path, gzip.compress(data, GZIP_LEVEL, mtime=0) if zipped else data)
    return len(changed)


def record_files(root: Path) -> List[Path]:
    """Every pattern, solution and decision file of every agent (aml's state excluded)."""
    return sorted(p for p in Path(root).glob("*/*.json")
                  if p.name in RECORD_FILES and not p.parent.name.startswith("."))


def mutate_store(root: Path, fraction: float, seed: int, now: _dt.datetime,
                 jobs: int = 1) -> Dict[str, int]:
    """Change ``fraction`` of all records, rewriting each touched file whole."""
    now_text = iso_ms(int(now.timestamp() * 1000))
    tasks = [(str(p), fraction, seed, now_text) for p in record_files(root)]
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
            counts = list(pool.map(mutate_file, tasks))
    else:
        counts = [mutate_file(t) for t in tasks]
    return {"records_changed": sum(counts), "files_changed": sum(1 for c in counts if c)}


# =============================================================================
# 5. Measuring a process
# Each figure is a whole process: start-up, imports and exit included, as cron sees it.
# Peak memory is the child's ru_maxrss from wait4().
# =============================================================================

@dataclasses.dataclass
class Run:
    """One timed process."""
    seconds: float
    maxrss_mb: float
    code: int
    stdout: str
    stderr: str


# The child is started from a small wrapper process, not from this one: a child forked from
# a big parent starts with the parent's resident size, which would inflate its ru_maxrss.
_WRAPPER = """
import os, signal, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[3], sys.argv[3:])
    finally:
        os._exit(127)
signal.signal(signal.SIGALRM, lambda *_: os.kill(pid, signal.SIGKILL))
signal.alarm(int(sys.argv[2]))
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - started
with open(sys.argv[1], "w") as out:
    out.write("%r %d %d" % (seconds, usage.ru_maxrss, os.waitstatus_to_exitcode(status)))
"""


PROCESS_TIMEOUT = 3600    # seconds; a hung command is killed and reported (exit -9)

# Profiles import aml as a module named "aml" (not run as __main__), so a process pool in aml
# can still pickle its worker functions by reference.
_PROFILE_DRIVER = """
import cProfile, importlib.util, sys
spec = importlib.util.spec_from_file_location("aml", sys.argv[1])
aml = importlib.util.module_from_spec(spec)
sys.modules["aml"] = aml
spec.loader.exec_module(aml)
profiler = cProfile.Profile()
code = profiler.runcall(aml.main, sys.argv[3:])
profiler.dump_stats(sys.argv[2])
sys.exit(code)
"""


def run_process(argv: Sequence[str], cwd: Optional[Path] = None,
                env: Optional[Dict[str, str]] = None, timeout: Optional[float] = None) -> Run:
    """Run argv to completion with stdout/stderr to temp files; time it and read its peak RSS."""
    import tempfile
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rusage") as figures:
        subprocess.run([sys.executable, "-S", "-c", _WRAPPER, figures.name,
                        str(int(timeout or PROCESS_TIMEOUT))] + list(argv),
                       stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                       cwd=str(cwd) if cwd else None, env=env, check=False)
        text = figures.read().split()
        out.seek(0)
        err.seek(0)
        stdout, stderr = (f.read().decode("utf-8", "replace") for f in (out, err))
    if len(text) != 3:
        return Run(0.0, 0.0, 127, stdout, stderr or "could not run %s" % argv[0])
    return Run(float(text[0]), int(text[1]) / 1024.0, int(text[2]), stdout, stderr)


def timed(func: Callable[[], Any]) -> float:
    """Seconds taken by an in-process call."""
    started = time.perf_counter()
    func()
    return time.perf_counter() - started


def spread(values: Sequence[float]) -> Dict[str, float]:
    """Median, min and max of some run times."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# =============================================================================
# 6. Floors: what this machine can do with the same bytes
# =============================================================================

def _data_files(root: Path) -> List[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and ".aml" not in p.parts)


def floor_sha256(files: Sequence[Path]) -> float:
    """Seconds to read and SHA-256 every byte."""
    def work() -> None:
        for path in files:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return timed(work)


def floor_zlib(files: Sequence[Path]) -> float:
    """Seconds to gzip-compress (zlib, level 6) every file's bytes in one process."""
    def work() -> None:
        for path in files:
            packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
            packer.compress(path.read_bytes())
            packer.flush()
    return timed(work)


DEFLATE_WORKERS = 2          # "deflate over both cores": the floors' parallel gzip
DEFLATE_CHUNK = 1024 * 1024


def gzip_level_of(raw: bytes) -> int:
    """The level a gzip member says it was made with (XFL: 2 = best, 4 = fastest), else 6."""
    return {2: 9, 4: 1}.get(raw[8] if len(raw) > 9 else 0, GZIP_LEVEL)


def deflate_parallel(data: bytes, level: int = GZIP_LEVEL, pool: Any = None) -> bytes:
    """One gzip member of ``data``, deflated in 1 MiB chunks on DEFLATE_WORKERS threads (as
    pigz: each chunk primed with the 32 KiB before it); what two cores can do."""
    view, total = memoryview(data), len(data)

    def chunk(start: int) -> bytes:
        end = min(start + DEFLATE_CHUNK, total)
        primer = bytes(view[max(0, start - 32768):start])
        packer = (zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, primer)
                  if primer else zlib.compressobj(level, zlib.DEFLATED, -15, 8))
        return packer.compress(view[start:end]) + packer.flush(
            zlib.Z_FINISH if end == total else zlib.Z_SYNC_FLUSH)

    own = pool is None
    pool = pool or concurrent.futures.ThreadPoolExecutor(max_workers=DEFLATE_WORKERS)
    try:
        crc = pool.submit(zlib.crc32, view)
        parts = list(pool.map(chunk, range(0, total, DEFLATE_CHUNK))) or [
            zlib.compress(b"", level, -15)]
        head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
        return head + b"".join(parts) + struct.pack("<II", crc.result(), total & 0xFFFFFFFF)
    finally:
        if own:
            pool.shutdown()


def floor_deflate(files: Sequence[Path]) -> float:
    """Seconds to deflate (level 6, both cores) the decoded content of every file: what a
    backup must at least spend compressing new bytes into its repository."""
    contents = [_decoded(p.read_bytes()) for p in files]
    with concurrent.futures.ThreadPoolExecutor(max_workers=DEFLATE_WORKERS) as pool:
        return timed(lambda: [deflate_parallel(c, GZIP_LEVEL, pool) for c in contents])


def _decoded(raw: bytes) -> bytes:
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def floor_inflate_sha256(files: Sequence[Path]) -> float:
    """Seconds to read every byte, SHA-256 it, and inflate + SHA-256 the content of gzip files
    (and of the zlib blocks of pack files): reading and checking everything, once."""
    def work() -> None:
        for path in files:
            raw = path.read_bytes()
            hashlib.sha256(raw).digest()
            if raw[:2] == b"\x1f\x8b":
                hashlib.sha256(gzip.decompress(raw)).digest()
            elif path.suffix == ".pack":
                _inflate_pack(raw)
    return timed(work)


def _inflate_pack(raw: bytes, feed: int = 1 << 16) -> None:
    """Inflate and hash the concatenated zlib blocks after a pack's 8-byte magic (fed 64 KiB
    at a time, so finding where each block ends copies nothing large)."""
    view, pos = memoryview(raw), 8
    while pos < len(raw):
        inflater, digest = zlib.decompressobj(), hashlib.sha256()
        try:
            while not inflater.eof and pos < len(raw):
                chunk = view[pos:pos + feed]
                digest.update(inflater.decompress(chunk))
                pos += len(chunk) - len(inflater.unused_data)
        except zlib.error:
            return


def floor_parse_write(files: Sequence[Path], scratch: Path, write_back: bool = True
                      ) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Per file: seconds to read it (inflate + json.loads: the read floor), and seconds to
    write it back durably (the rest of the rewrite floor).

    The write is what a rewrite keeping every record's original bytes costs: the decoded
    bytes written back, deflated again at the file's own level over both cores for gzip
    files, temp file, fsync, rename. ``write_back=False`` skips it."""
    parse, write = {}, {}
    scratch.mkdir(parents=True, exist_ok=True)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=DEFLATE_WORKERS)
    for path in files:
        started = time.perf_counter()
        raw = path.read_bytes()
        zipped = raw[:2] == b"\x1f\x8b"
        content = gzip.decompress(raw) if zipped else raw
        json.loads(content)
        middle = time.perf_counter()
        parse[str(path)] = middle - started
        if not write_back:
            continue
        data = deflate_parallel(content, gzip_level_of(raw), pool) if zipped else content
        tmp = scratch / ("w-" + path.name)
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, scratch / path.name)
        write[str(path)] = time.perf_counter() - middle
    pool.shutdown()
    shutil.rmtree(scratch, ignore_errors=True)
    return parse, write


def tool_available(name: str) -> bool:
    """Whether an external tool is on PATH."""
    return shutil.which(name) is not None


class PeerRepos:
    """restic and borg repositories of one store, initialised when the tool is installed."""

    def __init__(self, folder: Path, store: Path) -> None:
        self.store = store
        self.env = dict(os.environ, RESTIC_PASSWORD="bench", BORG_PASSPHRASE="",
                        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                        RESTIC_CACHE_DIR=str(folder / "restic-cache"))
        self.repos = {name: folder / name for name in ("restic", "borg")
                      if tool_available(name)}
        self.runs = 0
        folder.mkdir(parents=True, exist_ok=True)
        if "restic" in self.repos:
            run_process(["restic", "init", "--repo", str(self.repos["restic"])], env=self.env)
        if "borg" in self.repos:
            run_process(["borg", "init", "--encryption", "none", str(self.repos["borg"])],
                        env=self.env)

    def backup_argv(self, name: str, snapshot: str) -> List[str]:
        """The command that adds a snapshot of the store to ``name``'s repository."""
        if name == "restic":
            return ["restic", "backup", "--repo", str(self.repos[name]), str(self.store)]
        return ["borg", "create", "%s::%s" % (self.repos[name], snapshot), str(self.store)]

    def backup(self) -> None:
        """One more snapshot in each repository, with each tool's defaults."""
        self.runs += 1
        for name in self.repos:
            run_process(self.backup_argv(name, "day%d" % self.runs), env=self.env)

    def sizes(self) -> Dict[str, int]:
        return {name: tree_bytes(repo) for name, repo in self.repos.items()}


# =============================================================================
# 7. The benchmark of one store
# =============================================================================

def backup_root(store: Path) -> Path:
    """aml's default backup root: the store's sibling ``memory-backup`` folder."""
    return Path(store).parent / "memory-backup"


def find_id(document: Any) -> Optional[str]:
    """The snapshot id in a ``backup create --format json`` document (first id-like key)."""
    if isinstance(document, dict):
        for key in ("backup_id", "snapshot_id", "id"):
            if isinstance(document.get(key), str):
                return document[key]
        for value in document.values():
            found = find_id(value)
            if found:
                return found
    if isinstance(document, list):
        for value in reversed(document):
            found = find_id(value)
            if found:
                return found
    return None


class Bench:
    """Timings, floors and tool figures for one generated store."""

    def __init__(self, opts: argparse.Namespace, size_mb: float, base: Path,
                 meta: Dict[str, Any], scratch: Path, runs: int):
        self.opts, self.size_mb, self.base, self.meta, self.runs = opts, size_mb, base, meta, runs
        self.work = scratch / "work"
        self.store_bytes = tree_bytes(base)
        self.floors: Dict[str, Dict[str, Any]] = {}
        self.parse_s: Dict[str, float] = {}
        self.write_s: Dict[str, float] = {}
        self.helps: Dict[Tuple[str, ...], Optional[str]] = {}
        self.state: Dict[str, Any] = {"shared": {}}
        self.results: List[Dict[str, Any]] = []

    # -- processes and copies ------------------------------------------------
    def aml(self, store: Path, *args: str) -> Run:
        """Run aml.py on a store as a whole process."""
        return run_process([sys.executable, str(self.opts.aml), str(store)] + list(args),
                           cwd=self.work)

    def help_text(self, words: Sequence[str]) -> Optional[str]:
        """``--help`` of an aml command, or None when this aml.py does not have it."""
        key = tuple(words)
        if key not in self.helps:
            run = self.aml(self.work / "no-store", *(list(words) + ["--help"]))
            self.helps[key] = run.stdout if run.code == 0 else None
        return self.helps[key]

    def has_flag(self, words: Sequence[str], flag: str) -> bool:
        """Whether ``aml STORE words --help`` lists ``flag``."""
        return flag in (self.help_text(words) or "")

    def copy(self, name: str, source: Optional[Path] = None) -> Path:
        """A fresh copy of the store (or of ``source``) at work/<name>/memory; time excluded."""
        folder = self.work / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        run = run_process(["cp", "-a", str(source or self.base), str(folder / "memory")])
        if run.code:
            raise RuntimeError("cp -a failed: %s" % run.stderr.strip())
        return folder / "memory"

    def shared(self, name: str, prepare: Optional[Callable[[Path], None]] = None) -> Path:
        """A copy made once and reused by the operations that share it."""
        if name not in self.state["shared"]:
            path = self.copy(name)
            if prepare:
                prepare(path)
            self.state["shared"][name] = path
        return self.state["shared"][name]

    def changed_files(self, store: Path) -> List[str]:
        """Data files whose size or mtime differ from the pristine store (or were removed)."""
        changed = []
        for path in _data_files(self.base):
            rel = path.relative_to(self.base)
            other = store / rel
            a = path.stat()
            try:
                b = other.stat()
            except FileNotFoundError:
                changed.append(str(rel))
                continue
            if (a.st_size, a.st_mtime_ns) != (b.st_size, b.st_mtime_ns):
                changed.append(str(rel))
        return changed

    def rewrite_floor(self, changed: Sequence[str]) -> float:
        """Parse every record file, write back the changed ones: the floor of a rewrite."""
        parse = sum(v for k, v in self.parse_s.items() if Path(k).name in RECORD_FILES)
        return parse + sum(self.write_s.get(str(self.base / rel), 0.0) for rel in changed)

    # -- floors and tools ----------------------------------------------------
    def floor(self, name: str, seconds: float, nbytes: int, **extra: Any) -> None:
        """Record one floor or tool figure."""
        self.floors[name] = dict(extra, seconds=seconds, bytes=nbytes,
                                 mb_s=(nbytes / MB / seconds) if seconds else None)

    def plain_agent_files(self, root: Optional[Path] = None) -> List[Path]:
        """Agent data files stored as plain JSON (what ``optimize compress`` works on)."""
        root = root or self.base
        out = []
        for path in sorted(root.glob("*/*.json")):
            if path.parent.name in ("global",) or path.parent.name.startswith("."):
                continue
            with open(path, "rb") as handle:
                if handle.read(2) != b"\x1f\x8b":
                    out.append(path)
        return out

    def measure_floors(self, ops: Sequence["Op"]) -> None:
        """The floors and tools the selected operations compare with, on the pristine store."""
        files = _data_files(self.base)
        total = sum(p.stat().st_size for p in files)
        plain = self.plain_agent_files() if any(op.tool == "gzip -6" for op in ops) else []
        plain_bytes = sum(p.stat().st_size for p in plain)
        self.floor("sha256", floor_sha256(files), total)
        self.floor(INFLATE_SHA, floor_inflate_sha256(files), total)
        self.floor(DEFLATE2, floor_deflate(files), total)
        self.floor(BACKUP_FLOOR, self.floors[INFLATE_SHA]["seconds"] +
                   self.floors[DEFLATE2]["seconds"], total)
        if plain:
            self.floor("zlib-6 plain files", floor_zlib(plain), plain_bytes)
        jsons = [p for p in files if p.suffix == ".json"]
        rewrites = any(op.floor == REWRITE_FLOOR for op in ops)
        self.parse_s, self.write_s = floor_parse_write(jsons, self.work / "floor-write", rewrites)
        decoded = self.meta["json_bytes"]          # throughput of parsing is per decoded byte
        self.floor(READ_FLOOR, sum(self.parse_s.values()), decoded)
        if rewrites:
            self.floor("rewrite floor (every file)", sum(self.parse_s.values()) +
                       sum(self.write_s.values()), decoded)
        started = time.perf_counter()
        self.copy("floor-copy")
        self.floor("copy (cp -a)", time.perf_counter() - started, total)
        self.floor("python start-up", run_process([sys.executable, "-c", "pass"]).seconds, 0)
        self.floor("aml start-up", self.aml(self.work, "--version").seconds, 0)
        self.measure_tools(plain)
        shutil.rmtree(self.work / "floor-copy", ignore_errors=True)

    def measure_tools(self, plain: Sequence[Path]) -> None:
        """tar -czf / tar -xzf of the store, gzip -6 of the plain files, restic/borg if present."""
        tools = self.work / "tools"
        shutil.rmtree(tools, ignore_errors=True)
        tools.mkdir(parents=True)
        tgz = tools / "store.tar.gz"
        run = run_process(["tar", "-czf", str(tgz), "-C", str(self.base.parent), self.base.name])
        self.floor("tar -czf", run.seconds, self.store_bytes, output_bytes=tgz.stat().st_size,
                   maxrss_mb=run.maxrss_mb)
        (tools / "x").mkdir()
        run = run_process(["tar", "-xzf", str(tgz), "-C", str(tools / "x")])
        self.floor("tar -xzf", run.seconds, self.store_bytes, maxrss_mb=run.maxrss_mb)
        shutil.rmtree(tools / "x")
        self.state["tgz_bytes"] = tgz.stat().st_size
        if plain:
            folder = tools / "gz"
            folder.mkdir()
            copies = []
            for i, path in enumerate(plain):
                copies.append(folder / ("%d-%s" % (i, path.name)))
                shutil.copy2(path, copies[-1])
            run = run_process(["gzip", "-6", "--"] + [str(p) for p in copies])
            after = sum(p.stat().st_size for p in folder.iterdir())
            before = sum(p.stat().st_size for p in plain)
            self.floor("gzip -6", run.seconds, before, output_bytes=after,
                       maxrss_mb=run.maxrss_mb)
        self.measure_backup_tools(tools)
        shutil.rmtree(tools, ignore_errors=True)

    def measure_backup_tools(self, tools: Path) -> None:
        """restic and borg: backup, restore and a check reading all data, when installed."""
        peers = PeerRepos(tools, self.base)
        env, repos = peers.env, peers.repos
        if "restic" in repos:
            repo = str(repos["restic"])
            self._tool("restic backup", peers.backup_argv("restic", "bench"), env, repos["restic"])
            self._tool("restic restore", ["restic", "restore", "latest", "--repo", repo,
                                          "--target", str(tools / "restic-out")], env)
            self._tool("restic check --read-data", ["restic", "check", "--read-data",
                                                    "--repo", repo], env)
        if "borg" in repos:
            repo = str(repos["borg"])
            self._tool("borg create", peers.backup_argv("borg", "bench"), env, repos["borg"])
            out = tools / "borg-out"
            out.mkdir()
            self._tool("borg extract", ["borg", "extract", repo + "::bench"], env, cwd=out)
            self._tool("borg check --verify-data", ["borg", "check", "--verify-data", repo],
                       env)

    def _tool(self, name: str, argv: List[str], env: Dict[str, str],
              repo: Optional[Path] = None, cwd: Optional[Path] = None) -> None:
        """Time one peer-tool process; its figure is recorded only when it succeeded."""
        run = run_process(argv, cwd=cwd, env=env)
        if run.code == 0:
            extra = {"output_bytes": tree_bytes(repo)} if repo else {}
            self.floor(name, run.seconds, self.store_bytes, maxrss_mb=run.maxrss_mb, **extra)
        else:
            log("%s failed (exit %d): %s" % (name, run.code, run.stderr.strip()[-200:]))

    def floor_seconds(self, name: Optional[str]) -> Optional[float]:
        """A floor's time, measuring the lazy ones (the backup repository's SHA-256) on demand."""
        if name == REPO_FLOOR and name not in self.floors:
            root = backup_root(self.state["shared"].get("bk", self.work / "bk" / "memory"))
            if root.is_dir():
                files = [p for p in root.rglob("*") if p.is_file()]
                self.floor(name, floor_inflate_sha256(files),
                           sum(p.stat().st_size for p in files))
        entry = self.floors.get(name or "")
        return entry["seconds"] if entry else None

    # -- operations -----------------------------------------------------------
    def run_op(self, op: "Op") -> Dict[str, Any]:
        """Time one operation; a failure of the harness itself is reported, not raised."""
        result: Dict[str, Any] = {"name": op.name, "command": " ".join(op.command)}
        try:
            return self._run_op(op, result)
        except Exception as exc:  # noqa: BLE001 - one broken setup must not lose the table
            result["harness_error"] = "%s: %s" % (type(exc).__name__, exc)
            result.setdefault("available", True)
            return result

    def _run_op(self, op: "Op", result: Dict[str, Any]) -> Dict[str, Any]:
        """Time one operation ``self.runs`` times; a missing command is 'not available'."""
        if self.help_text(op.command) is None:
            result["available"] = False
            return result
        result["available"] = True
        runs, extras = [], []
        for i in range(self.runs):
            ctx = op.setup(self, i)
            if ctx.get("skip"):
                result["skipped"] = ctx["skip"]
                break
            argv = op.args(self, ctx)
            run = self.aml(ctx["store"], *argv)
            result["argv"] = ["aml.py", "STORE"] + argv
            extra = op.after(self, ctx, run) if op.after else {}
            runs.append({"seconds": run.seconds, "maxrss_mb": round(run.maxrss_mb, 1),
                         "code": run.code})
            extras.append(extra)
            if run.code not in op.ok_codes:
                result["error"] = (run.stderr.strip().splitlines() or ["exit %d" % run.code])[-1]
        result["runs"] = runs
        if runs:
            result.update(spread([r["seconds"] for r in runs]))
            result["maxrss_mb"] = max(r["maxrss_mb"] for r in runs)
            result["codes"] = sorted({r["code"] for r in runs})
            result["extra"] = extras[-1]
            self.compare(op, result, extras)
            if self.opts.profile_misses and result.get("target", {}).get("status") == "MISS":
                result["profile"] = self.profile(op, result["median"])
        return result

    def profile(self, op: "Op", median: float, top: int = 12) -> List[str]:
        """One more run under cProfile: the functions that take the time (own time first)."""
        import pstats
        ctx = op.setup(self, self.runs)
        out = self.work / "profile.out"
        run = run_process([sys.executable, "-c", _PROFILE_DRIVER, str(self.opts.aml), str(out),
                           str(ctx["store"])] + op.args(self, ctx), cwd=self.work,
                          timeout=max(120, 10 * median))
        if not out.is_file():
            return ["profile run did not finish (exit %d)" % run.code]
        stats = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
        rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
        total = sum(v[2] for v in stats.values()) or 1.0
        lines = ["%5.1f %% own %7.3f s, cumulative %7.3f s  %s (%s:%d)" % (
            100 * tt / total, tt, ct, func, Path(path).name, line)
            for (path, line, func), (_, _, tt, ct, _) in rows]
        return lines + ["(this process only: time in worker processes aml starts is not shown)"]

    def compare(self, op: "Op", result: Dict[str, Any], extras: List[Dict[str, Any]]) -> None:
        """Ratios to the floor, the nearest tool and the original claim; the target verdict."""
        median = result["median"]
        floors = [e["floor_seconds"] for e in extras if "floor_seconds" in e]
        floor = statistics.median(floors) if floors else self.floor_seconds(op.floor)
        if floor:
            result["floor"] = {"name": op.floor, "seconds": floor, "ratio": median / floor}
        tool = self.floors.get(op.tool or "")
        if tool:
            result["tool"] = {"name": op.tool, "seconds": tool["seconds"],
                              "ratio": median / tool["seconds"]}
        claim = op.claim(self) if op.claim else None
        if claim:
            result["claim"] = {"text": claim[0], "seconds": claim[1], "ratio": median / claim[1]}
        if op.target:
            text, verdict = op.target(self, result)
            status = {True: "PASS", False: "MISS", None: "n/a"}[verdict]
            if result.get("error"):
                status = "FAILED RUN"     # a figure from a failed run proves nothing
            result["target"] = {"text": text, "status": status}


@dataclasses.dataclass
class Op:
    """One benchmarked operation: how to prepare a run, the command, and what to compare with."""
    name: str
    command: Tuple[str, ...]                                  # words probed with --help
    args: Callable[[Bench, Dict[str, Any]], List[str]]        # arguments after STORE
    setup: Callable[[Bench, int], Dict[str, Any]]             # untimed; returns {"store": ...}
    floor: Optional[str] = None                               # a Bench.floors key
    tool: Optional[str] = None
    claim: Optional[Callable[[Bench], Optional[Tuple[str, float]]]] = None
    target: Optional[Callable[[Bench, Dict[str, Any]], Tuple[str, Optional[bool]]]] = None
    after: Optional[Callable[[Bench, Dict[str, Any], Run], Dict[str, Any]]] = None
    ok_codes: Tuple[int, ...] = (0,)


# =============================================================================
# 8. The operations table
# Setups are untimed (copies, mutations, removing the previous repository); each
# destructive operation gets a fresh copy of the store for every run.
# =============================================================================

REWRITE_FLOOR = "rewrite floor (read floor + write back the rewritten files)"
READ_FLOOR = "read floor (inflate + json.loads)"
INFLATE_SHA = "inflate + sha256"
DEFLATE2 = "deflate-6 of the JSON, 2 cores"
BACKUP_FLOOR = "inflate + sha256 + deflate-6 (2 cores)"
REPO_FLOOR = "inflate + sha256 of backup repo"


def _ro(b: Bench, i: int) -> Dict[str, Any]:
    return {"store": b.shared("ro")}


def _fresh(name: str) -> Callable[[Bench, int], Dict[str, Any]]:
    return lambda b, i: {"store": b.copy(name)}


def _fresh_indexed(name: str) -> Callable[[Bench, int], Dict[str, Any]]:
    """A fresh copy with a current index (untimed), as cron's nightly ``optimize index``
    leaves the store before the monthly ``optimize all``: compress then skips the parse of
    every file the index vouches for (same size and mtime as when it was parsed)."""
    def setup(b: Bench, i: int) -> Dict[str, Any]:
        store = b.copy(name)
        if b.help_text(("optimize", "index")) is not None:
            b.aml(store, "optimize", "index")
        return {"store": store}
    return setup


def _no_backup(b: Bench, words: Sequence[str]) -> List[str]:
    """``--no-backup`` when the command has it: the safety backup is timed on its own."""
    return ["--no-backup"] if b.has_flag(words, "--no-backup") else []


def _sample_id(b: Bench) -> str:
    """An id from the middle of the largest agent's patterns file."""
    agent = max(b.meta["agents"], key=lambda a: a["files"]["patterns.json"]["bytes"])
    return agent["files"]["patterns.json"]["sample_ids"][0]


def _indexed(b: Bench, i: int) -> Dict[str, Any]:
    def prepare(store: Path) -> None:
        if b.help_text(("optimize", "index")) is not None:
            b.aml(store, "optimize", "index")
        b.aml(store, "get", _sample_id(b))          # warm: a first lookup may build the index
    return {"store": b.shared("idx", prepare)}


def _rewrite_after(b: Bench, ctx: Dict[str, Any], run: Run) -> Dict[str, Any]:
    changed = b.changed_files(ctx["store"])
    return {"files_changed": len(changed), "floor_seconds": b.rewrite_floor(changed)}


def _migrate_after(b: Bench, ctx: Dict[str, Any], run: Run) -> Dict[str, Any]:
    extra = _rewrite_after(b, ctx, run)
    extra["ms_per_1000_records"] = run.seconds * 1000 / (b.meta["records"] / 1000.0)
    return extra


def _bk(b: Bench) -> Path:
    return b.shared("bk")


def _full_setup(b: Bench, i: int) -> Dict[str, Any]:
    store = _bk(b)
    shutil.rmtree(backup_root(store), ignore_errors=True)
    return {"store": store}


def _snapshot_after(kind: str) -> Callable[[Bench, Dict[str, Any], Run], Dict[str, Any]]:
    def after(b: Bench, ctx: Dict[str, Any], run: Run) -> Dict[str, Any]:
        try:
            snapshot = find_id(json.loads(run.stdout))
        except ValueError:
            snapshot = None
        if run.code == 0 and snapshot:
            b.state["latest_id"] = snapshot
            if kind == "full":
                b.state["full_id"] = snapshot
        extra = {"snapshot": snapshot, "repo_bytes": tree_bytes(backup_root(ctx["store"]))}
        extra.update({k: v for k, v in ctx.items() if k != "store"})
        return extra
    return after


def _incremental_setup(change: float) -> Callable[[Bench, int], Dict[str, Any]]:
    def setup(b: Bench, i: int) -> Dict[str, Any]:
        if "full_id" not in b.state:
            return {"skip": "no full backup to build on"}
        store = _bk(b)
        if not change:
            return {"store": store}
        moment = NOW + _dt.timedelta(hours=i + 1)
        counts = mutate_store(store, change, 1000 + i, moment, b.opts.jobs)
        return dict(counts, store=store)
    return setup


def _with_snapshot(b: Bench, i: int) -> Dict[str, Any]:
    if "latest_id" not in b.state:
        return {"skip": "no snapshot"}
    return {"store": _bk(b), "id": b.state["latest_id"]}


def _restore_setup(b: Bench, i: int) -> Dict[str, Any]:
    ctx = _with_snapshot(b, i)
    if not b.has_flag(("backup", "restore"), "--target"):
        ctx["skip"] = "restore has no --target (would overwrite the store)"
    ctx["target"] = b.work / "restored"
    shutil.rmtree(ctx["target"], ignore_errors=True)
    return ctx


def _restore_after(b: Bench, ctx: Dict[str, Any], run: Run) -> Dict[str, Any]:
    """Whether the restored tree has the same data files as the store it was taken from."""
    source = ctx["store"]
    rel = sorted(str(p.relative_to(source)) for p in _data_files(source))
    same = all((ctx["target"] / r).is_file() and
               (ctx["target"] / r).read_bytes() == (source / r).read_bytes() for r in rel)
    return {"identical_to_source": same, "files": len(rel)}


def _maintained(b: Bench) -> Path:
    """The backed-up store with an index built: what monitoring sees on a maintained store."""
    if "mon-base" not in b.state["shared"]:
        path = b.copy("mon-base", source=_bk(b))
        if b.help_text(("optimize", "index")) is not None:
            b.aml(path, "optimize", "index")
        b.state["shared"]["mon-base"] = path
    return b.state["shared"]["mon-base"]


def _monitor(cmd: str, second: bool) -> Callable[[Bench, int], Dict[str, Any]]:
    def setup(b: Bench, i: int) -> Dict[str, Any]:
        store = b.copy("mon", source=_maintained(b))
        if second:
            b.aml(store, "monitor", cmd)
        return {"store": store}
    return setup


def _compress_after(b: Bench, ctx: Dict[str, Any], run: Run) -> Dict[str, Any]:
    before = b.plain_agent_files()
    rels = [p.relative_to(b.base) for p in before]
    old = sum(p.stat().st_size for p in before)
    new = sum((ctx["store"] / r).stat().st_size for r in rels if (ctx["store"] / r).exists())
    return {"plain_bytes_before": old, "bytes_after": new,
            "reduction": (1 - new / old) if old else None}


def _per10(b: Bench, ms: float, label: str) -> Tuple[str, float]:
    return ("%s per 10 MB" % label, ms / 1000.0 * b.store_bytes / (10 * MB))


CLAIMS = {
    "backup full": lambda b: _per10(b, 500, "~500 ms"),
    "backup incremental": lambda b: _per10(b, 100, "~100 ms"),
    "restore": lambda b: _per10(b, 400, "~400 ms"),
    "verify": lambda b: _per10(b, 200, "~200 ms"),
    "compress": lambda b: ("~100 ms per MB", 0.1 * sum(
        p.stat().st_size for p in b.plain_agent_files()) / MB) if b.plain_agent_files() else None,
    "migrate": lambda b: ("50 ms per 1,000 records (best of 50-150)",
                          0.05 * b.meta["records"] / 1000.0),
}


def _within(floor_factor: float) -> Callable[[Bench, Dict[str, Any]], Tuple[str, Optional[bool]]]:
    def target(b: Bench, r: Dict[str, Any]) -> Tuple[str, Optional[bool]]:
        return _checks([("time x floor", r.get("floor", {}).get("ratio"), floor_factor)])
    return target


def _checks(parts: List[Tuple[str, Optional[float], float]]) -> Tuple[str, Optional[bool]]:
    """Several ``(label, ratio, limit)`` targets as one cell: each with its ratio and verdict;
    the whole passes when every measured one does (None when none could be measured)."""
    texts, verdicts = [], []
    for label, ratio, limit in parts:
        if ratio is None:
            texts.append("%s <= %.1fx: not measured" % (label, limit))
            continue
        verdicts.append(ratio <= limit)
        verdict = ("PASS " if verdicts[-1] else "MISS ") if len(parts) > 1 else ""
        texts.append("%s%s <= %.1fx (%.2fx)" % (verdict, label, limit, ratio))
    return "; ".join(texts), (all(verdicts) if verdicts else None)


def _ratio(b: Bench, r: Dict[str, Any], name: str) -> Optional[float]:
    tool = b.floors.get(name)
    return r["median"] / tool["seconds"] if tool and tool["seconds"] else None


def _size_ratio(b: Bench, repo: Optional[int], name: str) -> Optional[float]:
    tool = b.floors.get(name)
    return repo / tool["output_bytes"] if repo and tool and tool.get("output_bytes") else None


def _backup_target(b: Bench, r: Dict[str, Any]) -> Tuple[str, Optional[bool]]:
    repo = r.get("extra", {}).get("repo_bytes")
    return _checks([("time x floor", r.get("floor", {}).get("ratio"), 2.0),
                    ("repo x tar.gz", _size_ratio(b, repo, "tar -czf"), 1.1),
                    ("time x restic", _ratio(b, r, "restic backup"), 1.5),
                    ("repo x restic's", _size_ratio(b, repo, "restic backup"), 1.0)])


def _under(seconds: float, label: str) -> Callable[[Bench, Dict[str, Any]],
                                                   Tuple[str, Optional[bool]]]:
    return lambda b, r: ("< %g s (%s)" % (seconds, label), r["median"] < seconds)


def _restore_target(b: Bench, r: Dict[str, Any]) -> Tuple[str, Optional[bool]]:
    same = r.get("extra", {}).get("identical_to_source")
    text, ok = _checks([("time x tar -xzf", _ratio(b, r, "tar -xzf"), 2.0),
                        ("time x restic", _ratio(b, r, "restic restore"), 1.5)])
    if same is False:
        return (text + "; restored tree DIFFERS", False)
    return (text, ok)


def _verify_target(b: Bench, r: Dict[str, Any]) -> Tuple[str, Optional[bool]]:
    """Verify reads the repository: its floor is inflating and hashing the repository's bytes."""
    return _checks([("time x floor", r.get("floor", {}).get("ratio"), 2.0),
                    ("time x restic", _ratio(b, r, "restic check --read-data"), 1.5)])


def _compress_target(b: Bench, r: Dict[str, Any]) -> Tuple[str, Optional[bool]]:
    reduction = r.get("extra", {}).get("reduction")
    if "tool" not in r or reduction is None:
        return (">= 1.8x gzip -6 speed, >= 70 % smaller", None)
    speed = 1 / r["tool"]["ratio"]
    return (">= 1.8x gzip -6 speed (%.2fx), >= 70 %% smaller (%.0f %%)" % (speed, reduction * 100),
            speed >= 1.8 and reduction >= 0.70)


def operations() -> List[Op]:
    """Every benchmarked operation, in the order they run (backups before monitoring)."""
    return _maintenance_ops() + _backup_and_monitor_ops()


def _maintenance_ops() -> List[Op]:
    now = ["--now", NOW_TEXT]
    return [
        Op("prune --dry-run", ("prune",), lambda b, c: ["prune", "--dry-run"] + now, _ro,
           floor=READ_FLOOR, target=_within(1.3)),
        Op("prune", ("prune",), lambda b, c: ["prune"] + now + _no_backup(b, ("prune",)),
           _fresh("prune"), floor=REWRITE_FLOOR, target=_within(1.5),
           after=_rewrite_after, ok_codes=(0,)),
        Op("optimize index", ("optimize", "index"), lambda b, c: ["optimize", "index"],
           _fresh("index"), floor=READ_FLOOR, target=_within(1.3)),
        Op("get <id>", ("get",), lambda b, c: ["get", _sample_id(b)], _indexed,
           floor="aml start-up"),
        Op("search --tag --type", ("search",),
           lambda b, c: ["search", "--tag", "performance", "--type", "pattern", "--limit", "20"],
           _indexed, floor="aml start-up"),
        Op("search --text", ("search",),
           lambda b, c: ["search", "--text", "exponential backoff", "--limit", "20"],
           _indexed, floor="aml start-up"),
        Op("optimize compress", ("optimize", "compress"),
           lambda b, c: ["optimize", "compress", "--age-days", "0"] +
           _no_backup(b, ("optimize", "compress")), _fresh("compress"),
           floor="zlib-6 plain files", tool="gzip -6", claim=CLAIMS["compress"],
           target=_compress_target, after=_compress_after),
        Op("optimize compress, indexed", ("optimize", "compress"),
           lambda b, c: ["optimize", "compress", "--age-days", "0"] +
           _no_backup(b, ("optimize", "compress")), _fresh_indexed("compress-ix"),
           floor="zlib-6 plain files", tool="gzip -6", claim=CLAIMS["compress"],
           target=_compress_target, after=_compress_after),
        Op("optimize gc", ("optimize", "gc"),
           lambda b, c: ["optimize", "gc"] + _no_backup(b, ("optimize", "gc")), _fresh("gc"),
           floor=REWRITE_FLOOR, target=_within(1.5), after=_rewrite_after),
        Op("migrate migrate-latest", ("migrate", "migrate-latest"),
           lambda b, c: ["migrate", "migrate-latest"] + _no_backup(b, ("migrate",
                                                                         "migrate-latest")),
           _fresh("migrate"), floor=REWRITE_FLOOR, claim=CLAIMS["migrate"],
           target=_within(1.5), after=_migrate_after),
    ]


def _backup_and_monitor_ops() -> List[Op]:
    now = ["--now", NOW_TEXT]
    return [
        Op("backup create (full)", ("backup", "create"),
           lambda b, c: ["backup", "create", "--format", "json"], _full_setup,
           floor=BACKUP_FLOOR, tool="tar -czf", claim=CLAIMS["backup full"],
           target=_backup_target, after=_snapshot_after("full")),
        Op("backup incremental, no change", ("backup", "create"),
           lambda b, c: ["backup", "create", "--incremental", "--format", "json"],
           _incremental_setup(0.0), floor=INFLATE_SHA, claim=CLAIMS["backup incremental"],
           target=_under(1.0, "stated for 1 GB"), after=_snapshot_after("incremental")),
        Op("backup incremental, 1 % changed", ("backup", "create"),
           lambda b, c: ["backup", "create", "--incremental", "--format", "json"],
           _incremental_setup(0.01), floor=BACKUP_FLOOR, tool="tar -czf",
           claim=CLAIMS["backup incremental"], after=_snapshot_after("incremental")),
        Op("prune with its safety backup", ("prune",), lambda b, c: ["prune"] + now,
           _fresh("prune-safety"), floor=REWRITE_FLOOR,
           after=_rewrite_after),
        Op("optimize gc with its safety backup", ("optimize", "gc"),
           lambda b, c: ["optimize", "gc"], _fresh("gc-safety"), floor=REWRITE_FLOOR,
           after=_rewrite_after),
        Op("migrate with its safety backup", ("migrate", "migrate-latest"),
           lambda b, c: ["migrate", "migrate-latest"], _fresh("migrate-safety"),
           floor=REWRITE_FLOOR, after=_rewrite_after),
        Op("backup verify", ("backup", "verify"), lambda b, c: ["backup", "verify", c["id"]],
           _with_snapshot, floor=REPO_FLOOR, claim=CLAIMS["verify"],
           target=_verify_target),
        Op("backup verify --deep", ("backup", "verify"),
           lambda b, c: ["backup", "verify", c["id"], "--deep"], _with_snapshot,
           floor=READ_FLOOR),
        Op("backup restore --target", ("backup", "restore"),
           lambda b, c: ["backup", "restore", c["id"], "--target", str(c["target"])],
           _restore_setup, floor="copy (cp -a)", tool="tar -xzf", claim=CLAIMS["restore"],
           target=_restore_target, after=_restore_after),
        Op("monitor metrics (first run)", ("monitor", "metrics"),
           lambda b, c: ["monitor", "metrics"], _monitor("metrics", False), floor=READ_FLOOR),
        Op("monitor metrics (second run)", ("monitor", "metrics"),
           lambda b, c: ["monitor", "metrics"], _monitor("metrics", True), floor=READ_FLOOR),
        Op("monitor health (first run)", ("monitor", "health"),
           lambda b, c: ["monitor", "health"], _monitor("health", False), floor=READ_FLOOR,
           ok_codes=(0, 1, 2)),
        Op("monitor health (second run)", ("monitor", "health"),
           lambda b, c: ["monitor", "health"], _monitor("health", True), floor="aml start-up",
           target=_under(1.0, "stated for 1 GB"), ok_codes=(0, 1, 2)),
    ]


# =============================================================================
# 9. Backup repository growth over simulated days
# =============================================================================

def simulate_days(b: Bench, days: int, fraction: float = 0.01) -> Dict[str, Any]:
    """Full backup, then ``days`` days of ``fraction`` of records rewritten + an incremental."""
    if b.help_text(("backup", "create")) is None:
        return {"available": False}
    store = b.copy("days")
    root = backup_root(store)
    shutil.rmtree(root, ignore_errors=True)
    first = b.aml(store, "backup", "create", "--now", NOW_TEXT)
    if first.code:
        return {"available": True, "error": first.stderr.strip()[-300:]}
    one_full = tree_bytes(root)
    peers = PeerRepos(store.parent / "peers", store)
    peers.backup()
    peer_full = peers.sizes()
    seconds, changed, codes = [], 0, set()
    for day in range(1, days + 1):
        moment = NOW + _dt.timedelta(days=day)
        changed += mutate_store(store, fraction, day, moment, b.opts.jobs)["records_changed"]
        run = b.aml(store, "backup", "create", "--incremental", "--now",
                    moment.strftime("%Y-%m-%dT%H:%M:%SZ"))
        seconds.append(run.seconds)
        codes.add(run.code)
        peers.backup()
    repo = tree_bytes(root)
    peer_after = peers.sizes()
    tgz = b.state.get("tgz_bytes")
    result = {"available": True, "days": days, "fraction": fraction,
              "records_changed": changed, "store_bytes": tree_bytes(store),
              "one_full_bytes": one_full, "repo_bytes": repo, "tgz_bytes": tgz,
              "n_tgz_bytes": tgz * days if tgz else None, "ratio_to_full": repo / one_full,
              "ratio_to_n_tgz": repo / (tgz * days) if tgz else None,
              "daily_seconds": spread(seconds) if seconds else None, "codes": sorted(codes)}
    result["target"] = {"text": "repo <= 1.5x one full snapshot",
                        "status": "PASS" if repo <= 1.5 * one_full else "MISS"}
    result["peers"] = {name: {"one_full_bytes": peer_full[name], "repo_bytes": size,
                              "ratio_to_full": size / peer_full[name]}
                       for name, size in peer_after.items() if size and peer_full.get(name)}
    if "restic" in result["peers"]:
        growth = result["peers"]["restic"]["ratio_to_full"]
        result["peer_target"] = {"text": "grows less than restic's repository (%.2fx)" % growth,
                                 "status": "PASS" if repo / one_full < growth else "MISS"}
    shutil.rmtree(store.parent, ignore_errors=True)
    return result


# =============================================================================
# 10. Checks across sizes
# =============================================================================

def _op(size: Dict[str, Any], name: str) -> Optional[Dict[str, Any]]:
    for r in size["operations"]:
        if r["name"] == name and r.get("median") is not None:
            return r
    return None


def cross_size_checks(sizes: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """get <id> at the largest size vs the smallest; peak memory of backup, verify, restore."""
    if len(sizes) < 2:
        return []
    small, big = sizes[0], sizes[-1]
    label = "%s MiB vs %s MiB" % (big["size_mb"], small["size_mb"])
    checks = []
    a, z = _op(small, "get <id>"), _op(big, "get <id>")
    if a and z:
        ratio = z["median"] / a["median"]
        checks.append({"check": "get <id> whole-process time, " + label,
                       "value": "%s vs %s (%.2fx)" % (fmt_s(z["median"]), fmt_s(a["median"]),
                                                     ratio),
                       "target": "<= 1.2x", "status": "PASS" if ratio <= 1.2 else "MISS"})
    growth = big["largest_file_raw"] - small["largest_file_raw"]
    for name in ("backup create (full)", "backup verify", "backup restore --target"):
        a, z = _op(small, name), _op(big, name)
        if a and z:
            allowed = a["maxrss_mb"] + 10 * growth / MB + 16
            checks.append({"check": "peak memory of %s, %s" % (name, label),
                           "value": "%.0f MB vs %.0f MB (store %.0fx, largest file %.1f -> %.1f MB)"
                           % (z["maxrss_mb"], a["maxrss_mb"], big["store_bytes"] /
                              small["store_bytes"], small["largest_file_raw"] / MB,
                              big["largest_file_raw"] / MB),
                           "target": "independent of store size (<= small + 10x largest-file "
                                     "growth + 16 MB = %.0f MB)" % allowed,
                           "status": "PASS" if z["maxrss_mb"] <= allowed else "MISS"})
    return checks


# =============================================================================
# 11. Report: machine, Markdown tables, JSON
# =============================================================================

def machine() -> Dict[str, Any]:
    """CPU model, cores, RAM, Python, kernel and the scratch disk."""
    info: Dict[str, Any] = {"python": platform.python_version(),
                            "implementation": platform.python_implementation(),
                            "kernel": platform.release(), "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
        info["load_avg"] = os.getloadavg()
    except OSError:
        pass
    return info


def disk_of(path: Path) -> str:
    """The filesystem a path lives on (device, type, size), for the report."""
    run = run_process(["df", "-hT", str(path)])
    lines = run.stdout.strip().splitlines()
    if run.code or len(lines) < 2:
        return "unknown"
    parts = lines[-1].split()
    return "%s (%s, %s, %s free)" % (parts[0], parts[1], parts[2], parts[4])


def fmt_s(seconds: Optional[float]) -> str:
    """Seconds for a table: ms under a second."""
    if seconds is None:
        return "-"
    return "%.0f ms" % (seconds * 1000) if seconds < 1 else "%.2f s" % seconds


def fmt_x(ratio: Optional[float]) -> str:
    """A ratio for a table."""
    return "-" if ratio is None else "%.2fx" % ratio


def _op_row(r: Dict[str, Any]) -> str:
    if not r.get("available"):
        return "| %s | not available in this aml.py | | | | | |" % r["name"]
    if r.get("median") is None:
        why = r.get("harness_error") or "skipped: %s" % r.get("skipped", "no run")
        return "| %s | %s | | | | | |" % (r["name"], why)
    time_cell = "%s (%s-%s)" % (fmt_s(r["median"]), fmt_s(r["min"]), fmt_s(r["max"]))
    if r.get("error") or r["codes"] != [0]:
        time_cell += " exit %s" % ",".join(str(c) for c in r["codes"])
    f, t, c = r.get("floor"), r.get("tool"), r.get("claim")
    cells = [r["name"], time_cell, "%.0f MB" % r["maxrss_mb"],
             "%s %s" % (fmt_x(f["ratio"]), f["name"]) if f else "-",
             "%s %s" % (fmt_x(t["ratio"]), t["name"]) if t else "-",
             "%s (%s)" % (fmt_x(c["ratio"]), c["text"]) if c else "-",
             "**%s**: %s" % (r["target"]["status"], r["target"]["text"]) if r.get("target")
             else "-"]
    return "| " + " | ".join(cells) + " |"


def markdown_size(s: Dict[str, Any]) -> List[str]:
    """The tables for one store size."""
    lines = ["### %s MiB store: %s, %d agents, %s records, seed %d, %d run(s) per operation"
             % (s["size_mb"], s["encoding"], s["agents"], "{:,}".format(s["records"]),
                s["seed"], s["runs"]), "",
             "Store: %.1f MiB on disk (%.1f MiB of JSON), largest file %.1f MiB decoded; "
             "generated in %.1f s." % (s["store_bytes"] / MB, s["json_bytes"] / MB,
                                       s["largest_file_raw"] / MB, s["generate_seconds"]), "",
             "| operation | aml median (min-max) | peak RSS | x floor | x tool | x original claim "
             "| target |", "|---|---|---|---|---|---|---|"]
    lines += [_op_row(r) for r in s["operations"]]
    errors = ["- %s: %s" % (r["name"], r["error"]) for r in s["operations"] if r.get("error")]
    if errors:
        lines += ["", "Non-zero exits (last stderr line):", ""] + errors
    for r in s["operations"]:
        if r.get("profile"):
            lines += ["", "Profile of `%s` (missed: %s), one extra run:" % (
                r["name"], r["target"]["text"]), "", "```"] + r["profile"] + ["```"]
    lines += ["", "| floor / tool (same store, same run) | time | throughput | output |",
              "|---|---|---|---|"]
    for name, f in s["floors"].items():
        lines.append("| %s | %s | %s | %s |" % (
            name, fmt_s(f["seconds"]), "%.0f MB/s" % f["mb_s"] if f.get("mb_s") else "-",
            "%.1f MiB" % (f["output_bytes"] / MB) if f.get("output_bytes") else "-"))
    for name in ("restic", "borg"):
        if not any(k.startswith(name) for k in s["floors"]):
            lines.append("| %s | not installed | | |" % name)
    return lines + [""]


def markdown_peers(d: Dict[str, Any]) -> List[str]:
    """restic's and borg's repositories over the same simulated days, when installed."""
    lines = []
    for name, peer in sorted(d.get("peers", {}).items()):
        lines += ["%s, same store and days: one full %.1f MiB, after %d days %.1f MiB (%.2fx)"
                  % (name, peer["one_full_bytes"] / MB, d["days"], peer["repo_bytes"] / MB,
                     peer["ratio_to_full"]), ""]
    if d.get("peer_target"):
        lines += ["aml against restic: **%s** %s" % (d["peer_target"]["status"],
                                                     d["peer_target"]["text"]), ""]
    return lines


def markdown(report: Dict[str, Any]) -> str:
    """The whole report as Markdown."""
    m = report["machine"]
    lines = ["## aml benchmark, %s" % report["date"], "",
             "Command: `%s`  " % report["command"],
             "aml: %s  " % report["aml"],
             "Machine: %s, %s cores, %s GB RAM, %s %s, Linux %s, disk %s; load at start %s "
             "(shared machine: ratios are from one run)." % (
                 m.get("cpu", "?"), m.get("cores"), m.get("ram_gb", "?"),
                 m.get("implementation"), m.get("python"), m.get("kernel"), report["disk"],
                 ", ".join("%.2f" % x for x in m.get("load_avg", ()))), "",
             "Ratios are aml's median time divided by the other figure (below 1 = aml faster). "
             "Floors are measured in this process on the same bytes; tools run as processes.", ""]
    for s in report["sizes"]:
        lines += markdown_size(s)
    if report["cross_size"]:
        lines += ["### Across sizes", "", "| check | value | target | result |",
                  "|---|---|---|---|"]
        lines += ["| %s | %s | %s | %s |" % (c["check"], c["value"], c["target"], c["status"])
                  for c in report["cross_size"]] + [""]
    d = report.get("days")
    if d and d.get("repo_bytes"):
        lines += ["### Backup repository after %d simulated days (%s MiB store, %.0f %% of records "
                  "rewritten per day)" % (d["days"], d["size_mb"], d["fraction"] * 100), "",
                  "| one full snapshot | repository after %d days | %d x tar.gz | repo / one full "
                  "| repo / %d x tar.gz | daily incremental (median) | target |" % (
                      d["days"], d["days"], d["days"]), "|---|---|---|---|---|---|---|",
                  "| %.1f MiB | %.1f MiB | %.1f MiB | %.2fx | %s | %s | %s %s |" % (
                      d["one_full_bytes"] / MB, d["repo_bytes"] / MB,
                      (d["n_tgz_bytes"] or 0) / MB, d["ratio_to_full"],
                      fmt_x(d["ratio_to_n_tgz"]), fmt_s(d["daily_seconds"]["median"]),
                      d["target"]["status"], d["target"]["text"]), ""]
        lines += markdown_peers(d)
    elif d:
        lines += ["### Backup repository after simulated days", "",
                  "not available: %s" % d.get("error", "backup create is not in this aml.py"), ""]
    return "\n".join(lines)


# =============================================================================
# 12. Command line
# =============================================================================

GENERATOR_VERSION = 1   # bump when the generator's output changes, so cached stores regenerate


def prepared_store(opts: argparse.Namespace, size_mb: float) -> Tuple[Path, Dict[str, Any]]:
    """The generated store for a size (reused from the scratch folder when it matches)."""
    folder = Path(opts.scratch) / ("store-%gmb-%s-seed%d" % (size_mb, opts.encoding, opts.seed))
    meta_path = folder / "meta.json"
    wanted = {"size_mb": size_mb, "seed": opts.seed, "encoding": opts.encoding,
              "generator": GENERATOR_VERSION}
    if meta_path.is_file() and not opts.regen:
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in wanted.items()) and (folder / "memory").is_dir():
            return folder / "memory", meta
    shutil.rmtree(folder, ignore_errors=True)
    log("generating %g MiB %s store (seed %d, %d jobs)" % (size_mb, opts.encoding, opts.seed,
                                                          opts.jobs))
    meta = generate_store(folder / "memory", size_mb, opts.seed, opts.encoding, opts.jobs)
    meta.update(wanted)
    meta_path.write_text(json.dumps(meta, indent=1))
    log("generated %.1f MiB, %d records in %.1f s" % (meta["bytes"] / MB, meta["records"],
                                                       meta["generate_seconds"]))
    return folder / "memory", meta


def log(text: str) -> None:
    """Progress on stderr."""
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), text), file=sys.stderr, flush=True)


def bench_size(opts: argparse.Namespace, size_mb: float) -> Dict[str, Any]:
    """Floors, tools and every operation on one generated store."""
    base, meta = prepared_store(opts, size_mb)
    runs = opts.runs if size_mb < opts.large_from else min(opts.runs, opts.large_runs)
    bench = Bench(opts, size_mb, base, meta, base.parent, runs)
    shutil.rmtree(bench.work, ignore_errors=True)
    bench.work.mkdir(parents=True)
    selected = [op for op in operations()
                if not opts.only or any(op.name.startswith(word) for word in opts.only)]
    log("%g MiB: floors and tools" % size_mb)
    bench.measure_floors(selected)
    results = []
    for op in selected:
        result = bench.run_op(op)
        results.append(result)
        log("%g MiB: %-34s %s" % (size_mb, op.name, fmt_s(result.get("median")) if
                                  result.get("median") is not None else
                                  result.get("skipped", "not available")))
    summary = {"size_mb": size_mb, "encoding": opts.encoding, "seed": opts.seed, "runs": runs,
               "agents": len(meta["agents"]), "records": meta["records"],
               "store_bytes": bench.store_bytes, "json_bytes": meta["json_bytes"],
               "largest_file_raw": meta["largest_file_raw"],
               "generate_seconds": meta["generate_seconds"], "floors": bench.floors,
               "operations": results}
    if opts.days and size_mb == opts.days_size:
        log("%g MiB: %d simulated days of backups" % (size_mb, opts.days))
        summary["days"] = dict(simulate_days(bench, opts.days), size_mb=size_mb)
    if not opts.keep:
        shutil.rmtree(bench.work, ignore_errors=True)
    return summary


def aml_description(path: Path) -> str:
    """aml.py's version and the git commit it comes from, for the report."""
    version = run_process([sys.executable, str(path), "--version"]).stdout.strip()
    commit = run_process(["git", "-C", str(path.parent), "log", "-1", "--format=%h %s"])
    return "%s, %s (commit %s)" % (path, version or "version unknown",
                                   commit.stdout.strip()[:70] if commit.code == 0 else "unknown")


def write_report(opts: argparse.Namespace, report: Dict[str, Any]) -> Tuple[Path, Path]:
    """bench-results/bench-<date>.json and .md."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench-%s" % report["date"].replace(":", "").replace(" ", "-")
    json_path, md_path = out / (stem + ".json"), out / (stem + ".md")
    json_path.write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    md_path.write_text(markdown(report) + "\n")
    return json_path, md_path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="See the module docstring and README (Performance).")
    parser.add_argument("--sizes", default="10,100",
                        help="store sizes in MiB, comma-separated (default: 10,100)")
    parser.add_argument("--encoding", choices=("gzip", "plain", "mixed"), default="mixed",
                        help="agent files gzip, plain, or alternating (default: mixed)")
    parser.add_argument("--seed", type=int, default=1, help="generator seed (default: 1)")
    parser.add_argument("--runs", type=int, default=3, help="runs per operation (default: 3)")
    parser.add_argument("--large-runs", type=int, default=1,
                        help="runs per operation for large stores (default: 1)")
    parser.add_argument("--large-from", type=float, default=500,
                        help="size in MiB from which --large-runs applies (default: 500)")
    parser.add_argument("--days", type=int, default=30,
                        help="simulated days of backups, 0 to skip (default: 30)")
    parser.add_argument("--days-size", type=float, default=None,
                        help="store size for the simulated days (default: the smallest size)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only the operations whose name starts with one of these "
                             "(e.g. get backup 'monitor health')")
    parser.add_argument("--aml", type=Path, default=HERE / "aml.py", help="the aml.py to measure")
    parser.add_argument("--scratch", default=os.path.join(
        os.environ.get("TMPDIR", "/tmp"), "aml-bench"), help="where stores are generated")
    parser.add_argument("--out", default=str(HERE / "bench-results"),
                        help="where results are written (default: bench-results/)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes for generating stores (default: all cores)")
    parser.add_argument("--profile-misses", action="store_true",
                        help="rerun each operation that misses its target under cProfile and "
                             "report where the time goes")
    parser.add_argument("--regen", action="store_true", help="regenerate cached stores")
    parser.add_argument("--keep", action="store_true", help="keep the working copies")
    parser.add_argument("--generate-only", action="store_true",
                        help="generate the stores and stop")
    opts = parser.parse_args(argv)
    opts.sizes = [float(s) if "." in s else int(s) for s in opts.sizes.split(",") if s.strip()]
    if opts.days_size is None:
        opts.days_size = min(opts.sizes)
    opts.aml = opts.aml.resolve()
    return opts


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; returns 0 (targets missed are reported, not an error)."""
    opts = parse_args(argv)
    Path(opts.scratch).mkdir(parents=True, exist_ok=True)
    if opts.generate_only:
        for size in opts.sizes:
            prepared_store(opts, size)
        return 0
    report: Dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H%M", time.gmtime()) + "Z",
        "command": shlex.join(["python3", "bench_aml.py"] + list(sys.argv[1:] if argv is None
                                                                 else argv)),
        "aml": aml_description(opts.aml), "machine": machine(),
        "disk": disk_of(Path(opts.scratch)), "sizes": [], "cross_size": []}
    for size in sorted(opts.sizes):
        summary = bench_size(opts, size)
        if "days" in summary:
            report["days"] = summary.pop("days")
        report["sizes"].append(summary)
        report["cross_size"] = cross_size_checks(report["sizes"])
        paths = write_report(opts, report)       # after each size: a long run keeps its results
    print(markdown(report))
    log("wrote %s and %s" % paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
