"""Passwords: Argon2id through argon2-cffi, off the event loop.

The parameters default to OWASP's recommended minimum for Argon2id (19 MiB of memory, 2
iterations, 1 lane: ~20 ms a hash on one core of the machines Herald is tested on) and are
settings (`PASSWORD_HASH_MEMORY_KIB`, `PASSWORD_HASH_TIME_COST`, `PASSWORD_HASH_PARALLELISM`).
Each hash stores its own parameters and salt (the PHC string), so raising them later is safe:
a hash made with older ones still verifies, and is replaced at its owner's next sign-in.

At most `concurrency` hashes run at once, each on one of `concurrency` threads of their own
(each hash holds its memory for its whole run): a burst of sign-ins waits its turn instead of
exhausting memory, and the rate limits bound the burst. Threads of their own, not asyncio's
shared pool: glibc gives each thread that allocates its own heap arena, and an arena keeps a
freed hash's 19 MiB for the next one, so hashes spread over the shared pool's six threads held
~76 MB for good against ~38 MB on two (RSS after 200 hashes either way, measured in a
throwaway script).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# A password no one has, hashed once: checking a sign-in of an unknown user (or of an account
# with no password) against it costs what checking a real one does, so the time an answer takes
# does not tell whether the user exists.
_NOBODY = "herald: no such user"


@dataclass(frozen=True)
class PasswordParameters:
    time_cost: int = 2
    memory_kib: int = 19 * 1024
    parallelism: int = 1


class Passwords:
    def __init__(self, parameters: PasswordParameters, *, concurrency: int = 2) -> None:
        self.parameters = parameters
        self._hasher = PasswordHasher(
            time_cost=parameters.time_cost,
            memory_cost=parameters.memory_kib,
            parallelism=parameters.parallelism,
        )
        self._threads = ThreadPoolExecutor(concurrency, thread_name_prefix="argon2")
        self._nobody: str | None = None

    async def hash(self, password: str) -> str:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self._hasher.hash, password)

    async def verify(self, stored: str | None, password: str) -> bool:
        """Whether `password` matches `stored` (None: no password, never a match, in the same
        time as a real check)."""
        no_password = stored is None
        if stored is None:
            if self._nobody is None:
                self._nobody = await self.hash(_NOBODY)
            stored = self._nobody
        loop = asyncio.get_running_loop()
        matched = await loop.run_in_executor(self._threads, self._matches, stored, password)
        return matched and not no_password

    def close(self) -> None:
        """Let the threads end once the hashes in progress are done (at shutdown)."""
        self._threads.shutdown(wait=False)

    def needs_rehash(self, stored: str) -> bool:
        """Whether `stored` was made with other parameters than today's."""
        try:
            return self._hasher.check_needs_rehash(stored)
        except InvalidHashError:
            return True

    def _matches(self, stored: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False
