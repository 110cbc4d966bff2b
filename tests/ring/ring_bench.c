// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * Native micro-benchmark of guest-driver/ivl_ring.c in user space.
 *
 * Two processes (fork) share one memfd laid out as two ivl_rings (control +
 * data, one per direction) plus a small bench control page; eventfds are the
 * doorbells.  The producer rings only when ivl_ring_need_kick() says so; the
 * consumer sleeps on its eventfd after ivl_ring_enable_kick() finds nothing.
 * When the ring is full the producer asks for a space kick (a flag in the
 * bench page, Dekker-style with full barriers both sides) and sleeps.
 *
 * Every record is copied in (memcpy into the ring) and out (memcpy from the
 * ring into a private buffer), as the driver copies frames.
 *
 * Measures, medians over repetitions:
 *   - ring throughput for records of 64 B .. 64 KiB (GB/s, records/s);
 *   - single-core memcpy bandwidth for the same sizes, in cache (one
 *     buffer pair reused), through the ring's footprint (walking 2 x 1 MiB,
 *     the reference for the ring: its records stream through 1 MiB) and
 *     out of cache (walking 2 x 128 MiB);
 *   - round-trip latency of a 64 B record through both rings, next to a
 *     plain eventfd ping-pong and TCP over loopback (TCP_NODELAY).
 *
 * Prints one JSON object on stdout.  Environment:
 *   IVL_BENCH_SECONDS  seconds per throughput sample (default 0.5)
 *   IVL_BENCH_REPS     repetitions of every measurement (default 5)
 *   IVL_BENCH_RTTS     round trips per latency sample (default 20000)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <assert.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ivl_ring.h"

#define RING_SIZE	(1U << 20)
#define RING_STRIDE	(IVL_RING_CTRL_SIZE + RING_SIZE)
#define CTL_OFF		(2 * RING_STRIDE)
#define MEM_SIZE	(CTL_OFF + 4096)
#define MAX_SAMPLES	64
#define OOC_BYTES	(128U << 20)	/* out-of-cache walk, >> L3 */
#define MSG		64U

/* the memcpy buffers are OOC_BYTES; the ring-footprint walk must fit */
static_assert(RING_SIZE <= OOC_BYTES, "memcpy buffers too small");

/* Marker records (length 1; data records are never that short). */
#define MARK_END	'E'	/* end of a throughput phase: ack it */
#define MARK_QUIT	'Q'

enum { MODE_SINK = 0, MODE_ECHO = 1 };

/* Bench control page: not part of the ivloop ABI. */
struct bench_ctl {
	u32 mode;		/* written by the parent between phases */
	u32 pad0[15];
	u32 want_space;		/* A's producer sleeps until the consumer kicks */
	u32 pad1[15];
};

static const u32 sizes[] = { 64, 256, 1024, 4096, 16384, 65536 };
#define NR_SIZES	(sizeof(sizes) / sizeof(sizes[0]))

static double bench_seconds = 0.5;
static int reps = 5;
static long rtts = 20000;

static u8 *mem;
static struct bench_ctl *ctl;
/* eventfds: data doorbells for A (parent->child) and B, space for A, ack */
static int efd_a, efd_b, efd_space, efd_ack;

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void kick(int fd)
{
	u64 one = 1;

	if (write(fd, &one, sizeof(one)) != sizeof(one))
		die("eventfd write");
}

static void wait_fd(int fd)
{
	u64 v;

	if (read(fd, &v, sizeof(v)) != sizeof(v))
		die("eventfd read");
}

static void pin(int cpu, int ncpu)
{
	cpu_set_t set;

	if (ncpu < 2)
		return;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set))
		die("sched_setaffinity");
}

/* Block until a record is there (need_kick protocol); 0 or -EBADMSG. */
static int ring_wait(struct ivl_ring *r, int efd, struct ivl_rec *rec)
{
	for (;;) {
		int err = ivl_ring_peek(r, rec);

		if (err != -EAGAIN)
			return err;
		if (ivl_ring_enable_kick(r)) {	/* records raced in */
			ivl_ring_disable_kick(r);
			continue;
		}
		wait_fd(efd);
		ivl_ring_disable_kick(r);
	}
}

/* Produce @len bytes from @src into @r, sleeping while full. */
static void ring_send(struct ivl_ring *r, int efd, const void *src, u32 len,
		      bool space_wait)
{
	void *d;

	while (!(d = ivl_ring_reserve(r, len))) {
		if (ivl_ring_check_producer(r))
			die("ring broken");
		if (!space_wait) {
			sched_yield();
			continue;
		}
		WRITE_ONCE(ctl->want_space, 1);
		/* orders the want_space store before the cons load in has_room */
		virt_mb();
		if (ivl_ring_has_room(r, len)) {
			WRITE_ONCE(ctl->want_space, 0);
			continue;
		}
		if (ivl_ring_need_kick(r))	/* a sleeping consumer must drain */
			kick(efd);
		wait_fd(efd_space);
	}
	memcpy(d, src, len);
	ivl_ring_commit(r, len, NULL);
	if (ivl_ring_need_kick(r))
		kick(efd);
}

/* The child: consumer of A, producer of B. */
static void child(int ncpu)
{
	struct ivl_ring a, b;
	struct ivl_rec rec;
	u8 *dst = malloc(IVL_MAX_FRAME);

	pin(1, ncpu);
	if (!dst || ivl_ring_attach_consumer(&a, mem, RING_SIZE) ||
	    ivl_ring_attach_producer(&b, mem + RING_STRIDE, RING_SIZE))
		die("child attach");
	for (;;) {
		u32 len;

		if (ring_wait(&a, efd_a, &rec))
			die("child: ring A broken");
		len = rec.len;
		memcpy(dst, rec.data, len);	/* copy out once */
		ivl_ring_consume(&a, &rec);
		/*
		 * Orders the cons store before the want_space load.  The
		 * producer sleeps until half the ring is free (hysteresis, as
		 * the driver kicks once per NAPI batch, not per record): while
		 * more than half is in use, records remain and we come back.
		 */
		virt_mb();
		if (READ_ONCE(ctl->want_space) &&
		    a.other - a.cons <= RING_SIZE / 2) {
			WRITE_ONCE(ctl->want_space, 0);
			kick(efd_space);
		}
		if (len == 1 && dst[0] == MARK_QUIT)
			_exit(0);
		if (len == 1 && dst[0] == MARK_END) {
			kick(efd_ack);
			continue;
		}
		if (READ_ONCE(ctl->mode) == MODE_ECHO)
			ring_send(&b, efd_b, dst, len, false);
	}
}

static int cmp_double(const void *x, const void *y)
{
	double a = *(const double *)x, b = *(const double *)y;

	return (a > b) - (a < b);
}

static double median(double *v, int n)
{
	qsort(v, (size_t)n, sizeof(*v), cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static double pct(const double *sorted, long n, double p)
{
	long i = (long)(p / 100.0 * (double)(n - 1) + 0.5);

	return sorted[i < 0 ? 0 : (i >= n ? n - 1 : i)];
}

static void print_samples(const double *v, int n)
{
	int i;

	printf("[");
	for (i = 0; i < n; i++)
		printf("%s%.6g", i ? ", " : "", v[i]);
	printf("]");
}

/* One throughput sample: GB/s and records/s for @len records. */
static void ring_throughput(struct ivl_ring *a, u32 len, const u8 *src,
			    double *gbps, double *rps)
{
	static const u8 end = MARK_END;
	double t0 = now(), t1;
	long n = 0;

	do {
		int i;

		for (i = 0; i < 64; i++)
			ring_send(a, efd_a, src, len, true);
		n += 64;
	} while (now() - t0 < bench_seconds);
	ring_send(a, efd_a, &end, 1, true);
	wait_fd(efd_ack);	/* every record was copied out */
	t1 = now() - t0;
	*gbps = (double)n * len / t1 / 1e9;
	*rps = (double)n / t1;
}

/* Latency stats in microseconds from @rtt (seconds), sorted in place. */
static void print_lat(const char *name, double *rtt, long n, bool last)
{
	double sum = 0;
	long i;

	qsort(rtt, (size_t)n, sizeof(*rtt), cmp_double);
	for (i = 0; i < n; i++)
		sum += rtt[i];
	printf("    \"%s\": {\"n\": %ld, \"mean\": %.3f, \"min\": %.3f, "
	       "\"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f}%s\n", name, n,
	       sum / (double)n * 1e6, rtt[0] * 1e6, pct(rtt, n, 50) * 1e6,
	       pct(rtt, n, 90) * 1e6, pct(rtt, n, 99) * 1e6, last ? "" : ",");
}

static void ring_pingpong(struct ivl_ring *a, struct ivl_ring *b, double *rtt,
			  long n)
{
	u8 msg[MSG], back[MSG];
	struct ivl_rec rec;
	long i;

	memset(msg, 0x5a, sizeof(msg));
	for (i = -100; i < n; i++) {	/* 100 warm-up round trips */
		double t0 = now();

		ring_send(a, efd_a, msg, MSG, true);
		if (ring_wait(b, efd_b, &rec) || rec.len != MSG)
			die("ping-pong reply");
		memcpy(back, rec.data, MSG);
		ivl_ring_consume(b, &rec);
		if (i >= 0)
			rtt[i] = now() - t0;
	}
}

static void eventfd_pingpong(int ncpu, double *rtt, long n)
{
	int ping = eventfd(0, 0), pong = eventfd(0, 0);
	long i, total = n + 100;
	pid_t pid;

	if (ping < 0 || pong < 0)
		die("eventfd");
	pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		pin(1, ncpu);
		for (i = 0; i < total; i++) {
			wait_fd(ping);
			kick(pong);
		}
		_exit(0);
	}
	for (i = -100; i < n; i++) {
		double t0 = now();

		kick(ping);
		wait_fd(pong);
		if (i >= 0)
			rtt[i] = now() - t0;
	}
	waitpid(pid, NULL, 0);
	close(ping);
	close(pong);
}

static void full_io(int fd, void *buf, size_t len, bool wr)
{
	size_t done = 0;

	while (done < len) {
		ssize_t r = wr ? write(fd, (u8 *)buf + done, len - done) :
				 read(fd, (u8 *)buf + done, len - done);
		if (r <= 0)
			die("tcp io");
		done += (size_t)r;
	}
}

static void tcp_pingpong(int ncpu, double *rtt, long n)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	socklen_t sl = sizeof(sa);
	int one = 1, lfd, fd;
	long i, total = n + 100;
	u8 buf[MSG];
	pid_t pid;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	lfd = socket(AF_INET, SOCK_STREAM, 0);
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) ||
	    listen(lfd, 1) || getsockname(lfd, (struct sockaddr *)&sa, &sl))
		die("tcp listen");
	pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		pin(1, ncpu);
		fd = accept(lfd, NULL, NULL);
		if (fd < 0)
			die("accept");
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		for (i = 0; i < total; i++) {
			full_io(fd, buf, MSG, false);
			full_io(fd, buf, MSG, true);
		}
		_exit(0);
	}
	fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
		die("tcp connect");
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	memset(buf, 0x5a, sizeof(buf));
	for (i = -100; i < n; i++) {
		double t0 = now();

		full_io(fd, buf, MSG, true);
		full_io(fd, buf, MSG, false);
		if (i >= 0)
			rtt[i] = now() - t0;
	}
	waitpid(pid, NULL, 0);
	close(fd);
	close(lfd);
}

/*
 * Single-core memcpy bandwidth (GB/s of bytes copied), @len bytes at a time,
 * @src and @dst each walked over @span bytes before wrapping: @len (in
 * cache), RING_SIZE (the ring's footprint) or OOC_BYTES (out of cache).
 */
static double memcpy_bw(u32 len, size_t span, u8 *src, u8 *dst)
{
	double t0 = now(), t;
	size_t off = 0;
	long n = 0;

	do {
		int i;

		for (i = 0; i < 64; i++) {
			memcpy(dst + off, src + off, len);
			off += len;
			if (off + len > span)
				off = 0;
		}
		n += 64;
		/* keep the compiler from dropping the copies */
		__asm__ __volatile__("" : : "r"(dst) : "memory");
		t = now() - t0;
	} while (t < bench_seconds / 2);
	return (double)n * len / t / 1e9;
}

/* "memcpy_@name_gbps" and "ratio_@name" (ring / memcpy) of "reference" */
static void print_ref(const char *name, double ring, double mc, bool last)
{
	printf("\"memcpy_%s_gbps\": %.4f, \"ratio_%s\": %.4f%s", name, mc,
	       name, ring / mc, last ? "},\n" : ", ");
}

static void cpu_model(char *buf, size_t len)
{
	FILE *f = fopen("/proc/cpuinfo", "r");
	char line[256];

	snprintf(buf, len, "unknown");
	if (!f)
		return;
	while (fgets(line, sizeof(line), f)) {
		char *c = strchr(line, ':');

		if (!strncmp(line, "model name", 10) && c) {
			snprintf(buf, len, "%s", c + 2);
			buf[strcspn(buf, "\n\"\\")] = 0;
			break;
		}
	}
	fclose(f);
}

int main(void)
{
	double gbps[NR_SIZES][MAX_SAMPLES], rps[NR_SIZES][MAX_SAMPLES];
	double mc_in[NR_SIZES][MAX_SAMPLES], mc_ring[NR_SIZES][MAX_SAMPLES];
	double mc_out[NR_SIZES][MAX_SAMPLES];
	double *rtt_ring, *rtt_efd, *rtt_tcp, ring;
	struct ivl_ring a, b;
	cpu_set_t avail;
	char model[128];
	u8 *src, *dst;
	const char *e;
	int ncpu, fd, r;
	unsigned int s;
	pid_t pid;

	e = getenv("IVL_BENCH_SECONDS");
	if (e)
		bench_seconds = atof(e);
	e = getenv("IVL_BENCH_REPS");
	if (e)
		reps = atoi(e);
	e = getenv("IVL_BENCH_RTTS");
	if (e)
		rtts = atol(e);
	if (bench_seconds <= 0 || reps < 1 || reps > MAX_SAMPLES || rtts < 1) {
		fprintf(stderr, "bad IVL_BENCH_* settings\n");
		return 2;
	}
	if (sched_getaffinity(0, sizeof(avail), &avail))
		die("sched_getaffinity");
	ncpu = CPU_COUNT(&avail);
	cpu_model(model, sizeof(model));

	fd = memfd_create("ivl-ring-bench", 0);
	if (fd < 0 || ftruncate(fd, MEM_SIZE))
		die("memfd");
	mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	ctl = (struct bench_ctl *)(mem + CTL_OFF);
	efd_a = eventfd(0, 0);
	efd_b = eventfd(0, 0);
	efd_space = eventfd(0, 0);
	efd_ack = eventfd(0, 0);
	if (efd_a < 0 || efd_b < 0 || efd_space < 0 || efd_ack < 0)
		die("eventfd");

	/* memcpy first, while nothing else runs */
	pin(0, ncpu);
	src = aligned_alloc(4096, OOC_BYTES);
	dst = aligned_alloc(4096, OOC_BYTES);
	if (!src || !dst)
		die("alloc");
	memset(src, 0x5a, OOC_BYTES);
	memset(dst, 0, OOC_BYTES);
	for (r = 0; r < reps; r++)
		for (s = 0; s < NR_SIZES; s++) {
			u32 len = sizes[s];

			mc_in[s][r] = memcpy_bw(len, len, src, dst);
			mc_ring[s][r] = memcpy_bw(len, RING_SIZE, src, dst);
			mc_out[s][r] = memcpy_bw(len, OOC_BYTES, src, dst);
		}

	rtt_ring = calloc((size_t)rtts, sizeof(double));
	rtt_efd = calloc((size_t)rtts, sizeof(double));
	rtt_tcp = calloc((size_t)rtts, sizeof(double));
	if (!rtt_ring || !rtt_efd || !rtt_tcp)
		die("alloc");

	pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0)
		child(ncpu);
	if (ivl_ring_attach_producer(&a, mem, RING_SIZE) ||
	    ivl_ring_attach_consumer(&b, mem + RING_STRIDE, RING_SIZE))
		die("parent attach");

	/* interleave sizes within each repetition */
	WRITE_ONCE(ctl->mode, MODE_SINK);
	for (r = 0; r < reps; r++)
		for (s = 0; s < NR_SIZES; s++)
			ring_throughput(&a, sizes[s], src, &gbps[s][r],
					&rps[s][r]);
	WRITE_ONCE(ctl->mode, MODE_ECHO);
	ring_pingpong(&a, &b, rtt_ring, rtts);
	{
		static const u8 quit = MARK_QUIT;

		ring_send(&a, efd_a, &quit, 1, true);
	}
	waitpid(pid, NULL, 0);
	eventfd_pingpong(ncpu, rtt_efd, rtts);
	tcp_pingpong(ncpu, rtt_tcp, rtts);

	printf("{\n  \"tool\": \"ring_bench\",\n");
	printf("  \"ring_size\": %u,\n  \"reps\": %d,\n", RING_SIZE, reps);
	printf("  \"seconds_per_sample\": %g,\n", bench_seconds);
	printf("  \"cpus\": %d,\n  \"pinned\": %s,\n", ncpu,
	       ncpu >= 2 ? "true" : "false");
	printf("  \"cpu_model\": \"%s\",\n", model);
	printf("  \"throughput\": [\n");
	for (s = 0; s < NR_SIZES; s++) {
		printf("    {\"record_bytes\": %u, \"gbps_samples\": ", sizes[s]);
		print_samples(gbps[s], reps);
		printf(", \"gbps\": %.4f, \"records_per_s\": %.0f}%s\n",
		       median(gbps[s], reps), median(rps[s], reps),
		       s + 1 < NR_SIZES ? "," : "");
	}
	printf("  ],\n  \"memcpy\": [\n");
	for (s = 0; s < NR_SIZES; s++) {
		printf("    {\"bytes\": %u, ", sizes[s]);
		printf("\"in_cache_gbps\": %.4f, ", median(mc_in[s], reps));
		printf("\"ring_footprint_gbps\": %.4f, ",
		       median(mc_ring[s], reps));
		printf("\"out_of_cache_gbps\": %.4f}%s\n",
		       median(mc_out[s], reps), s + 1 < NR_SIZES ? "," : "");
	}
	s = NR_SIZES - 1;
	ring = median(gbps[s], reps);
	printf("  ],\n  \"reference\": {\"record_bytes\": %u, ", sizes[s]);
	printf("\"ring_gbps\": %.4f, ", ring);
	print_ref("in_cache", ring, median(mc_in[s], reps), false);
	print_ref("ring_footprint", ring, median(mc_ring[s], reps), false);
	print_ref("out_of_cache", ring, median(mc_out[s], reps), true);
	printf("  \"latency_us\": {\n    \"message_bytes\": %u,\n", MSG);
	print_lat("ring", rtt_ring, rtts, false);
	print_lat("eventfd", rtt_efd, rtts, false);
	print_lat("tcp_loopback", rtt_tcp, rtts, true);
	printf("  }\n}\n");
	return 0;
}
