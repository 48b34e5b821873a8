"""A real SMTP server on 127.0.0.1 (aiosmtpd) for the e2e tests.

Prints one JSON line {"port": N} when it listens, writes each accepted message to
<dir>/<uuid>.json as {"mail_from", "rcpt_tos", "data"}, and exits when its stdin closes.
--reject DOMAIN=CODE TEXT answers RCPT TO of that domain with that reply (e.g. "550 5.1.1 no").
It offers no STARTTLS.
"""
import argparse
import asyncio
import json
import os
import sys
import uuid

from aiosmtpd.smtp import SMTP


class Handler:
    def __init__(self, directory, reject):
        self.directory = directory
        self.reject = reject

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        domain = address.rsplit("@", 1)[-1].lower()
        if domain in self.reject:
            return self.reject[domain]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        path = os.path.join(self.directory, uuid.uuid4().hex + ".json")
        with open(path + ".tmp", "w") as f:
            json.dump(
                {
                    "mail_from": envelope.mail_from,
                    "rcpt_tos": envelope.rcpt_tos,
                    "data": envelope.content.decode("utf-8", "replace"),
                },
                f,
            )
        os.rename(path + ".tmp", path)
        return "250 Message accepted"


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--reject", action="append", default=[])
    a = p.parse_args()
    reject = {}
    for r in a.reject:
        domain, reply = r.split("=", 1)
        reject[domain.lower()] = reply
    handler = Handler(a.dir, reject)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.test"), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": port}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


asyncio.run(main())
