"""The baseline: what a user of the blog post does without kakao-tokend.

One refresh per process start, as cron would run it: load kakao_token.json, POST grant_type=refresh_token,
rename the old file to a timestamped backup, and json.dump the merged tokens, exactly as the seed's
update_tokens() does (including its faults: a moment with no token file, no fsync, and a rotated refresh
token dropped). urllib stands in for requests so the baseline needs nothing installed; requests would only
add to its start-up cost. This file is the benchmark's baseline, not part of the product.
"""

import datetime
import json
import os
import sys
import urllib.parse
import urllib.request


def load_tokens(filename):
    with open(filename) as fp:
        return json.load(fp)


def save_tokens(filename, tokens):
    with open(filename, "w") as fp:
        json.dump(tokens, fp)


def update_tokens(url, app_key, filename):
    tokens = load_tokens(filename)
    data = urllib.parse.urlencode(
        {"grant_type": "refresh_token", "client_id": app_key, "refresh_token": tokens["refresh_token"]}
    ).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data)) as response:
        body = json.load(response)
    now = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    os.rename(filename, filename + "." + now)
    tokens["access_token"] = body["access_token"]
    save_tokens(filename, tokens)
    return tokens


if __name__ == "__main__":
    update_tokens(sys.argv[1], sys.argv[2], sys.argv[3])
    # Measurement only: this process's peak resident size, which the benchmark cannot read from outside
    # (the kernel's per-child figures include the forking process's memory).
    if os.environ.get("BENCH_REPORT_RSS"):
        with open("/proc/self/status") as status:
            print(next(line for line in status if line.startswith("VmHWM:")).split()[1], file=sys.stderr)
