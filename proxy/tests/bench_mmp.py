"""coffer-mmp benchmark (not a test): logins/s through the proxy (plain and
TLS) vs straight to the store, proxy CPU per TLS handshake vs openssl speed,
memory per idle proxied session. Run against a Release build:

  COFFER_BUILD_DIR=/work/build-proxy-rel python3 proxy/tests/bench_mmp.py
  BENCH_RESUME=no ...    (backend.tls_resume = no: a full TLS handshake to the
                          store per login, for comparison)
"""

import os
import socket
import ssl
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "e2e"))
sys.path.insert(0, os.path.dirname(__file__))
import coffer_harness as ch  # noqa: E402
import mmp_harness as mh  # noqa: E402
import idle_mem_mmp as im  # noqa: E402
from coffer_harness import HOST  # noqa: E402

N_LOGIN = int(os.environ.get("BENCH_LOGINS", "400"))
N_HS = int(os.environ.get("BENCH_HANDSHAKES", "1000"))
N_IDLE = int(os.environ.get("BENCH_IDLE", "500"))
THREADS = 4
# BENCH_RESUME=no: the proxy makes a full TLS handshake to the store per login
RESUME = os.environ.get("BENCH_RESUME", "yes")


def cpu_s(pid):
    with open("/proc/%d/stat" % pid) as f:
        w = f.read().rsplit(")", 1)[1].split()
    return (int(w[11]) + int(w[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


def login_once(port, tls, ctx, user, pw):
    s = socket.create_connection((HOST, port), timeout=30)
    if tls:
        s = ctx.wrap_socket(s)
    f = s.makefile("rb")
    f.readline()
    s.sendall(b"a LOGIN %s %s\r\n" % (user.encode(), pw.encode()))
    line = f.readline()
    while not line.startswith(b"a "):
        line = f.readline()
    assert line.startswith(b"a OK"), line
    s.sendall(b"b LOGOUT\r\n")
    f.close()
    s.close()


def rate(label, port, tls, ctx, pw, pids):
    per = N_LOGIN // THREADS
    c0 = {p: cpu_s(p) for p in pids}
    t0 = time.monotonic()
    ths = [threading.Thread(target=lambda: [login_once(port, tls, ctx, "alice", pw)
                                             for _ in range(per)]) for _ in range(THREADS)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    dt = time.monotonic() - t0
    n = per * THREADS
    cpu = {p: (cpu_s(p) - c0[p]) * 1000 / n for p in pids}
    print("%-34s %7.0f logins/s   CPU ms/login: %s" % (label, n / dt, "  ".join(
        "%s %.3f" % (k, v) for k, v in zip(("store", "proxy"), cpu.values()))))


def main():
    cl = mh.ProxyCluster("bench", proxy_config={"auth.allow_plaintext": "yes",
                                                "auth.plaintext_networks": "127.0.0.0/8",
                                                "proxy.log_level": "warn",
                                                "limits.max_connections_per_ip": "100000",
                                                "limits.max_connections": "100000",
                                                "backend.tls_resume": RESUME},
                         store_config={"auth.scrypt_log2n": "10", "auth.allow_plaintext": "yes",
                                       "node.log_level": "warn"}, users=())
    try:
        pw = cl.store.add_user("alice")
        st, px = cl.store.pid, cl.mmp.pid
        ctx = cl.mmp.ctx
        print("logins (LOGIN + LOGOUT, %d threads, scrypt N=2^10):" % THREADS)
        rate("direct to store, plain", cl.store.imap_port, False, ctx, pw, [st])
        rate("direct to store, TLS", cl.store.imaps_port, True, ctx, pw, [st])
        rate("through proxy, plain", cl.mmp.imap_port, False, ctx, pw, [st, px])
        rate("through proxy, TLS", cl.mmp.imaps_port, True, ctx, pw, [st, px])

        # full TLS handshakes (no resumption) + greeting, proxy CPU only
        c0, t0 = cpu_s(px), time.monotonic()
        for _ in range(N_HS):
            s = ctx.wrap_socket(socket.create_connection((HOST, cl.mmp.imaps_port)))
            s.recv(200)
            s.close()
        dt, cpu = time.monotonic() - t0, cpu_s(px) - c0
        print("full TLS 1.3 handshakes: %d in %.2f s; proxy CPU %.3f ms each = %.0f per "
              "core-second" % (N_HS, dt, cpu * 1000 / N_HS, N_HS / cpu if cpu else 0))
        for alg in ("ecdsap256", "ecdhx25519"):
            r = subprocess.run(["openssl", "speed", "-seconds", "2", alg], capture_output=True,
                               text=True)
            print("  openssl speed %s: %s" % (alg, r.stdout.strip().splitlines()[-1]))

    finally:
        cl.close(check=False)

    # memory per idle logged-in session: a fresh store + proxy per mode (a
    # proxy that already served sessions reuses their freed memory)
    print("memory per idle proxied session (proxy/tests/idle_mem_mmp.py), KiB:")
    print("%-9s %9s %9s %9s    %9s %9s %9s" % ("mode", "proxyRSS", "RssAnon", "kept", "storeRSS",
                                               "RssAnon", "kept"))
    for mode in ("tls", "plain"):
        im.run_mode(mode, N_IDLE, resume=RESUME)


if __name__ == "__main__":
    main()
