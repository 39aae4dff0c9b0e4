"""Counting the DynamoDB reads the code makes while a test looks: the cost tests' meter."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest


@dataclass
class Reads:
    """DynamoDB requests by operation; `items` returned (what read units are billed on) and
    `entries` evaluated (a Query's or Scan's entries before its filter, ScannedCount)."""

    requests: Counter[str] = field(default_factory=Counter)
    items: int = 0
    entries: int = 0


def record_reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    """Every DynamoDB request from now on (botocore's _make_api_call, under PynamoDB and boto3
    alike), until the test ends."""
    import botocore.client

    original = botocore.client.BaseClient._make_api_call
    reads = Reads()

    def counting(client: Any, operation: str, params: dict) -> Any:
        answer = original(client, operation, params)
        if client.meta.service_model.service_name == "dynamodb":
            reads.requests[operation] += 1
            if operation in ("Query", "Scan"):
                reads.items += int(answer.get("Count", 0))
                reads.entries += int(answer.get("ScannedCount", 0))
            elif operation == "BatchGetItem":
                found = sum(len(items) for items in answer.get("Responses", {}).values())
                reads.items += found
                reads.entries += found
            elif operation == "GetItem":
                reads.items += int("Item" in answer)
                reads.entries += int("Item" in answer)
        return answer

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", counting)
    return reads
