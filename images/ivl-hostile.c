// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * ivl-hostile: a hostile (or broken) ivloop peer, for reliability tests.
 *
 * Runs in a guest whose ivshmem device has NO driver bound (boot it with
 * `driver = false` in the topology): it maps BAR0 and BAR2 through sysfs
 * (resource0, resource2) and writes whatever a misbehaving peer could.
 * It speaks ABI IVL_ABI_VERSION and refuses a region of another version.
 *
 *   ivl-hostile [-d PCI-ADDR] [-t SECONDS] [-m MAC] [-s SEED]
 *               [-o ON_MS] [-f OFF_MS] [-a IPV4] [-b IPV6] MODE
 *
 * Modes:
 *   info         print my IVPosition, slot and the directory (both halves)
 *   up, deaf     publish UP with my MAC (-m, default eth0's) and a live
 *                heartbeat for -t seconds, and never consume: a wedged peer
 *                (victims attach their rings to it, then must bypass it)
 *   flaky        like deaf, but in a loop: consume every ring to my slot
 *                for -o ON_MS (default 100), then nothing for -f OFF_MS
 *                (default 1500), for -t seconds; a peer that stalls and
 *                recovers for a moment, again and again
 *   claim        publish UP with the MAC given by -m (required: another
 *                VM's) and a live heartbeat, and consume every ring to my
 *                slot continuously for -t seconds (cons := prod every
 *                millisecond), so no stall detection ever fires: frames a
 *                victim routes to that MAC vanish into my rings
 *   bad-records  for every present peer: fake a rejoin (forge my own slot's
 *                generation until the server restores it: fake_rejoin()),
 *                then publish one crafted bad record (huge len, len past
 *                prod, crossing the ring end, bad flags, bad gso, bad csum,
 *                runt, prod out of range, misaligned prod), plus a bad cons
 *                in the peer's ring to me
 *   scribble     random bytes over every ring to and from my slot and
 *                over my own directory slot, for -t seconds
 *   lying-dir    my slot claims UP with a victim's MAC, the broadcast MAC,
 *                garbage state (written torn, outside the seq protocol),
 *                huge heartbeat jumps, a bad present/peer_id
 *   sane         my slot DOWN, its guest half zeroed under the seq protocol
 *                (seq kept, and left even: an odd seq a stuck run left is
 *                made even again), my rings zeroed
 *   bad-offload  (needs -a) claim my own MAC (-m, default eth0's) for -t
 *                seconds as claim does, a healthy peer; once the victims
 *                have attached their rings to me (each UP peer's ring from
 *                me asks for kicks, or 3 s pass), send every UP peer 5
 *                rounds, 50 ms apart, of well-formed frames with bad
 *                offload metadata, one record of each kind per round:
 *                  csum-in-eth     plain IPv4/TCP, csum_start 4 (in the
 *                                  Ethernet header), csum_offset 16
 *                  gso-v6-on-v4    IPv4/TCP, 3000 bytes, GSO TCPV6
 *                  gso-v4-on-v6    IPv6/TCP, 3000 bytes, GSO TCPV4 (needs
 *                                  -b, else skipped with a line saying so)
 *                  gso-udp-on-tcp  IPv4/TCP, 3000 bytes, GSO UDP_L4,
 *                                  csum_offset 6
 *                  gso-tcp-on-udp  IPv4/UDP, 3000 bytes, GSO TCPV4
 *                  csum-before-l4  plain IPv4/TCP, csum_start 14 (the IP
 *                                  header), csum_offset 10
 *                every one CSUM_PARTIAL, GSO ones with gso_size 1400 and
 *                the right csum_start; from my MAC to the victim's, IP
 *                10.77.0.250 / fd77::fa to -a / -b, TCP or UDP ports 9/9,
 *                IP checksum and lengths valid, the L4 check field holding
 *                the pseudo-header sum as for any CHECKSUM_PARTIAL frame.
 *                A victim that took the metadata would forward the frame
 *                (-a is an address it routes elsewhere) into segmentation
 *                or checksum code that WARNs; it must drop each record and
 *                count rx_bad_offload.  The rounds finish even past -t.
 *   stuck        publish UP with my own MAC (-m, default eth0's) and a live
 *                heartbeat, consuming every ring to my slot continuously as
 *                claim does; once the victims have attached their rings to
 *                me (as bad-offload waits), -o ON_MS later (default 1000)
 *                begin a rewrite of my guest half and never finish it: seq
 *                made odd (seq + 1, as the protocol's writer starts), no
 *                field written, and seq never made even again; heartbeat
 *                and consuming go on until -t seconds (default 10) from the
 *                start, and the exit leaves seq odd: a peer that died or was
 *                evicted mid-write.  Victims keep their last view of my
 *                half while it is odd, and must still see me leave when
 *                the server marks my slot absent.  The seq goes odd even
 *                past -t; SIGINT or SIGTERM before then exits with it even.
 *   dump-offload (debugging bad-offload; needs -a, maps no device) write
 *                one round of bad-offload's records into a ring in memory,
 *                from my MAC to 02:00:00:00:00:01, starting 4 KiB before
 *                the ring's end (so a PAD record shows), and print every
 *                record: header fields, then the frame in hex
 *
 * My guest half is written with the seq protocol of ivl_abi.h (seq odd,
 * fields, seq even) wherever a mode publishes a state: the lies are in
 * what it says, which a victim must check, not in torn writes, which the
 * protocol already catches.  Only scribble and lying-dir's garbage state
 * bypass it, and stuck, which starts a rewrite (seq odd) and never ends it.
 *
 * SIGINT or SIGTERM ends a timed mode early, its summary lines printed.
 * flaky, claim, bad-offload and stuck print "ivl-hostile: MODE consumed R
 * records B bytes"; bad-offload prints "ivl-hostile: bad-offload slot S
 * kind K sent N" for every victim and kind; stuck prints "ivl-hostile:
 * stuck slot S seq N" (N the odd seq) once it is stuck; every mode ends
 * with a line "ivl-hostile: MODE done N" (N = actions: attacks made,
 * consume phases for flaky, records written for bad-offload and
 * dump-offload, 1 for stuck once its seq is odd).  up, deaf, flaky, claim
 * and bad-offload print "ivl-hostile: published UP slot S mac M" once
 * peers can see it, stuck once the victims have also attached their rings.
 * Exit status: 0 ok, 1 runtime failure, 2 usage.
 */
#define _DEFAULT_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ivl_abi.h"

#define SLOT_CACHE	"/run/ivl-hostile.slot"
#define __maybe_unused	__attribute__((unused))
#define SLOT_OFF(f)	((size_t)__builtin_offsetof(struct ivl_slot, f))
#define STR_(x)		#x
#define STR(x)		STR_(x)

static volatile uint8_t *regs;	/* BAR0 */
static volatile uint8_t *region;	/* BAR2 */
static size_t region_len;
static uint32_t max_peers, ring_size, my_pos, my_slot = UINT32_MAX;
static uint64_t rings_off, ring_stride;
static uint8_t my_mac[6];
static int claiming;		/* bump the heartbeat while idling */
static uint64_t hb = 1000;
static unsigned long actions;
static unsigned int on_ms = 100, off_ms = 1500;	/* flaky's duty cycle */
#define STUCK_ON_MS	1000	/* stuck's -o default: attached to stuck */
#define STUCK_SECS	10	/* and its -t default */
static uint64_t consumed_recs, consumed_bytes;
static uint32_t half_seq;	/* my guest half's seq while I rewrite it */
static volatile sig_atomic_t stopping;	/* SIGINT/SIGTERM: finish early */

static void die(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fputs("ivl-hostile: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(1);
}

static uint16_t rd16(volatile uint8_t *p) { return *(volatile uint16_t *)p; }
static uint32_t rd32(volatile uint8_t *p) { return *(volatile uint32_t *)p; }
static uint64_t rd64(volatile uint8_t *p) { return *(volatile uint64_t *)p; }
static void wr16(volatile uint8_t *p, uint16_t v) { *(volatile uint16_t *)p = v; }
static void wr32(volatile uint8_t *p, uint32_t v) { *(volatile uint32_t *)p = v; }
static void wr64(volatile uint8_t *p, uint64_t v) { *(volatile uint64_t *)p = v; }
static void wr32_release(volatile uint8_t *p, uint32_t v)
{
	__atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE);
}

static uint32_t rd32_acquire(volatile uint8_t *p)
{
	return __atomic_load_n((uint32_t *)p, __ATOMIC_ACQUIRE);
}

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void sleep_ms(unsigned int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000 * 1000 };

	nanosleep(&ts, NULL);
}

static volatile uint8_t *slot(uint32_t i)
{
	return region + IVL_HDR_SIZE + (size_t)i * IVL_SLOT_SIZE;
}

static volatile uint8_t *ring(uint32_t prod, uint32_t cons)
{
	return region + rings_off + ((uint64_t)prod * max_peers + cons) * ring_stride;
}

#define CTRL_PROD	0
#define CTRL_CONS	64
#define CTRL_KICK	68

static void doorbell(uint32_t peer_id, uint32_t vec)
{
	wr32(regs + IVL_REG_DOORBELL, (peer_id << 16) | vec);
}

static void ring_all(uint32_t vec)
{
	for (uint32_t i = 0; i < max_peers; i++)
		if (i != my_slot && rd32(slot(i)) == 1 && rd32(slot(i) + 4) <= 0xffff)
			doorbell(rd32(slot(i) + 4), vec);
}

static void beat(void)
{
	if (claiming)
		wr64(slot(my_slot) + SLOT_OFF(heartbeat), ++hb);
}

/* Sleep @ms, keeping my heartbeat alive while claiming UP. */
static void idle(unsigned int ms)
{
	struct timespec ts = { 0, 20 * 1000 * 1000 };

	for (unsigned int t = 0; t < ms && !stopping; t += 20) {
		beat();
		nanosleep(&ts, NULL);
	}
}

static void on_signal(int sig)
{
	(void)sig;
	stopping = 1;
}

static void *map_bar(const char *dev, int bar, size_t *len)
{
	char path[256];
	struct stat st;
	void *p;
	int fd;

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource%d", dev, bar);
	fd = open(path, O_RDWR | O_SYNC);
	if (fd < 0)
		die("open %s: %s (is a driver bound?)", path, strerror(errno));
	if (fstat(fd, &st) < 0)
		die("stat %s: %s", path, strerror(errno));
	*len = (size_t)st.st_size < 4096 ? 4096 : (size_t)st.st_size;
	p = mmap(NULL, *len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		die("mmap %s: %s", path, strerror(errno));
	close(fd);
	return p;
}

static void find_dev(char *out, size_t n)
{
	char path[512], buf[32];
	struct dirent *e;
	DIR *d = opendir("/sys/bus/pci/devices");
	FILE *f;

	if (!d)
		die("no /sys/bus/pci/devices");
	while ((e = readdir(d))) {
		int ok = 0;

		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/vendor", e->d_name);
		f = fopen(path, "r");
		if (f && fgets(buf, sizeof(buf), f) && !strncmp(buf, "0x1af4", 6))
			ok = 1;
		if (f)
			fclose(f);
		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/device", e->d_name);
		f = fopen(path, "r");
		if (ok && f && fgets(buf, sizeof(buf), f) && !strncmp(buf, "0x1110", 6)) {
			snprintf(out, n, "%s", e->d_name);
			fclose(f);
			closedir(d);
			return;
		}
		if (f)
			fclose(f);
	}
	closedir(d);
	die("no ivshmem device (1af4:1110)");
}

static int parse_mac(const char *s, uint8_t *mac)
{
	unsigned int b[6];

	if (sscanf(s, "%x:%x:%x:%x:%x:%x", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5]) != 6)
		return -1;
	for (int i = 0; i < 6; i++)
		mac[i] = (uint8_t)b[i];
	return 0;
}

/* eth0's MAC into my_mac; -1 if there is none to read. */
static int eth0_mac(void)
{
	char buf[32] = "";
	FILE *f = fopen("/sys/class/net/eth0/address", "r");
	int err;

	if (!f)
		return -1;
	err = !fgets(buf, sizeof(buf), f) || parse_mac(buf, my_mac);
	fclose(f);
	return err ? -1 : 0;
}

static void default_mac(void)
{
	if (eth0_mac())
		die("cannot read eth0's MAC; pass -m");
}

static void put_mac(volatile uint8_t *s, const uint8_t *mac)
{
	for (int i = 0; i < 6; i++)
		s[SLOT_OFF(mac) + i] = mac[i];
}

/*
 * Rewrite my guest half under the seq protocol, as the driver does: seq
 * odd, then the fields, then seq even.  A seq some earlier run left odd
 * stays odd for the rewrite, so every rewrite changes it.
 */
static void half_begin(volatile uint8_t *s)
{
	half_seq = rd32(s + SLOT_OFF(seq)) | 1;
	wr32(s + SLOT_OFF(seq), half_seq);
	/* the odd seq is visible before any field store below (smp_wmb) */
	__atomic_thread_fence(__ATOMIC_RELEASE);
}

static void half_end(volatile uint8_t *s)
{
	/* every field store is visible before the even seq */
	wr32_release(s + SLOT_OFF(seq), half_seq + 1);
}

/* Publish UP as a well-behaved driver would, for my slot's generation. */
static void publish_up(const uint8_t *mac)
{
	volatile uint8_t *s = slot(my_slot);

	/* a fresh heartbeat before peers can see UP */
	wr64(s + SLOT_OFF(heartbeat), ++hb);
	half_begin(s);
	put_mac(s, mac);
	wr64(s + SLOT_OFF(joined_gen), rd64(s + 8));
	wr32(s + SLOT_OFF(state), IVL_STATE_UP);
	half_end(s);
	claiming = 1;
	ring_all(IVL_VEC_MEMBERSHIP);
}

static void say_published(const uint8_t *mac)
{
	printf("ivl-hostile: published UP slot %u mac %02x:%02x:%02x:%02x:%02x:%02x\n",
	       my_slot, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]);
	fflush(stdout);
}

/* A forged generation is held this long against the server's repairs... */
#define FORGE_MS	300
/* ...and the server given this long to put the real one back. */
#define RESTORE_MS	1000

/*
 * Pretend to have left and rejoined, so that victims forget their verdict
 * on me: they start afresh whenever a slot's generation changes.  The
 * generation is the server's, and the server restores it every police
 * interval.  So keep a forged one in place for FORGE_MS, rewriting it after
 * each repair, long enough for every victim's refresh to see it; then let
 * the server restore the real one (a second change) and publish UP for
 * that.  A server that restores nothing leaves the forged generation, and
 * UP is for that one.
 */
static void fake_rejoin(void)
{
	volatile uint8_t *s = slot(my_slot);
	uint64_t forged = rd64(s + 8) + 1000;
	uint64_t t0 = now_ms();

	while (now_ms() - t0 < FORGE_MS) {
		if (rd64(s + 8) != forged) {
			wr64(s + 8, forged);
			ring_all(IVL_VEC_MEMBERSHIP);
		}
		beat();
		sleep_ms(5);
	}
	t0 = now_ms();
	while (rd64(s + 8) == forged && now_ms() - t0 < RESTORE_MS)
		idle(20);
	publish_up(my_mac);
}

static void attach(const char *dev)
{
	char path[300];
	size_t len0;
	FILE *f;

	/* memory decoding on, as pci_enable_device() would (no driver does) */
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/enable", dev);
	f = fopen(path, "w");
	if (f) {
		fputs("1", f);
		fclose(f);
	}
	regs = map_bar(dev, 0, &len0);
	region = map_bar(dev, 2, &region_len);
	my_pos = rd32(regs + IVL_REG_IVPOSITION);
	if (rd32(region) != IVL_MAGIC)
		die("bad magic 0x%08x", rd32(region));
	if (rd32(region + 4) != IVL_ABI_VERSION)
		die("the region speaks ABI %u, ivl-hostile ABI %u (rebuild the image)",
		    rd32(region + 4), IVL_ABI_VERSION);
	max_peers = rd32(region + 16);
	ring_size = rd32(region + 20);
	rings_off = rd64(region + 32);
	ring_stride = rd64(region + 40);
	if (max_peers < 2 || max_peers > IVL_MAX_PEERS ||
	    rings_off + (uint64_t)max_peers * max_peers * ring_stride > region_len ||
	    ring_stride < IVL_RING_CTRL_SIZE + (uint64_t)ring_size)
		die("implausible header");
	for (uint32_t i = 0; i < max_peers; i++)
		if (rd32(slot(i)) == 1 && rd32(slot(i) + 4) == my_pos)
			my_slot = i;
	/*
	 * scribble overwrites my slot's present and peer_id too: then the
	 * slot the last run found (same IVPosition) is still mine.
	 */
	f = fopen(SLOT_CACHE, "r");
	if (f) {
		unsigned int pos, i;

		if (my_slot == UINT32_MAX && fscanf(f, "%u %u", &pos, &i) == 2 &&
		    pos == my_pos && i < max_peers)
			my_slot = i;
		fclose(f);
	}
	if (my_slot == UINT32_MAX)
		die("no present slot with peer_id %u", my_pos);
	f = fopen(SLOT_CACHE, "w");
	if (f) {
		fprintf(f, "%u %u\n", my_pos, my_slot);
		fclose(f);
	}
}

static void info(unsigned int secs __maybe_unused)
{
	printf("ivposition %u slot %u max_peers %u ring_size %u generation %llu\n",
	       my_pos, my_slot, max_peers, ring_size,
	       (unsigned long long)rd64(region + 48));
	for (uint32_t i = 0; i < max_peers; i++) {
		volatile uint8_t *s = slot(i);
		volatile uint8_t *m = s + SLOT_OFF(mac);
		volatile uint8_t *n = s + SLOT_OFF(nic_mac);

		printf("slot %u present %u peer_id %u gen %llu state %u mac %02x:%02x:%02x:%02x:%02x:%02x",
		       i, rd32(s), rd32(s + 4), (unsigned long long)rd64(s + 8),
		       rd32(s + SLOT_OFF(state)), m[0], m[1], m[2], m[3], m[4], m[5]);
		printf(" seq %u srv_seq %u srv_flags 0x%x nic_mac %02x:%02x:%02x:%02x:%02x:%02x leave_ack 0x%llx\n",
		       rd32(s + SLOT_OFF(seq)), rd32(s + SLOT_OFF(srv_seq)),
		       rd32(s + SLOT_OFF(srv_flags)), n[0], n[1], n[2], n[3], n[4], n[5],
		       (unsigned long long)rd64(s + SLOT_OFF(leave_ack)));
	}
}

static int victim(uint32_t i)
{
	return i != my_slot && rd32(slot(i)) == 1;
}

/* A record header at ring position @pos of ring @r. */
static void put_rec(volatile uint8_t *r, uint32_t pos, uint32_t len, uint16_t flags,
		    uint16_t gso_type, uint16_t gso_size, uint16_t cs, uint16_t co)
{
	volatile uint8_t *h = r + IVL_RING_CTRL_SIZE + (pos & (ring_size - 1));

	wr32(h, len);
	wr16(h + 4, flags);
	wr16(h + 6, gso_type);
	wr16(h + 8, gso_size);
	wr16(h + 10, cs);
	wr16(h + 12, co);
	wr16(h + 14, 0);
}

/* A plausible Ethernet frame to @dst after the header at @pos. */
static void put_frame(volatile uint8_t *r, uint32_t pos, const volatile uint8_t *dst,
		      uint32_t len)
{
	volatile uint8_t *f = r + IVL_RING_CTRL_SIZE + ((pos + 16) & (ring_size - 1));
	uint32_t room = ring_size - ((pos + 16) & (ring_size - 1));

	for (uint32_t k = 0; k < len && k < room; k++)
		f[k] = (uint8_t)(k < 6 ? dst[k] : k < 12 ? my_mac[k - 6] : k == 12 ? 0x08 : 0x45);
}

enum variant { V_HUGE_LEN, V_LEN_PAST_PROD, V_CROSS_END, V_BAD_FLAGS, V_BAD_GSO,
	       V_BAD_CSUM, V_RUNT, V_PROD_FAR, V_PROD_MISALIGNED, V_PROD_BACKWARDS, V_NR };
static const char *const vnames[V_NR] = {
	"huge-len", "len-past-prod", "cross-end", "bad-flags", "bad-gso", "bad-csum",
	"runt", "prod-out-of-range", "prod-misaligned", "prod-backwards",
};

static int wait_cons(volatile uint8_t *r, uint32_t want, unsigned int ms)
{
	for (unsigned int t = 0; t < ms; t += 20) {
		if (__atomic_load_n((uint32_t *)(r + CTRL_CONS), __ATOMIC_ACQUIRE) == want)
			return 0;
		idle(20);
	}
	return -1;
}

static void bad_record(uint32_t j, enum variant v)
{
	volatile uint8_t *r = ring(my_slot, j);
	volatile uint8_t *dst = slot(j) + SLOT_OFF(mac);
	uint32_t c = __atomic_load_n((uint32_t *)(r + CTRL_CONS), __ATOMIC_ACQUIRE);
	uint32_t peer = rd32(slot(j) + 4), prod = c, tail;

	switch (v) {
	case V_HUGE_LEN:
		put_rec(r, c, 0x7fffffffU, 0, 0, 0, 0, 0);
		prod = c + 64;
		break;
	case V_LEN_PAST_PROD:
		put_rec(r, c, 1000, 0, 0, 0, 0, 0);
		put_frame(r, c, dst, 1000);
		prod = c + 64;
		break;
	case V_CROSS_END:
		/* a legal pad up to 32 bytes before the end, then a record across it */
		tail = ring_size - (c & (ring_size - 1));
		if (tail > 32) {
			put_rec(r, c, tail - 32 - 16, IVL_REC_PAD, 0, 0, 0, 0);
			wr32_release(r + CTRL_PROD, c + tail - 32);
			doorbell(peer, IVL_VEC_DATA);
			if (wait_cons(r, c + tail - 32, 2000))
				fprintf(stderr, "ivl-hostile: peer %u did not consume the pad\n", j);
			c += tail - 32;
		}
		put_rec(r, c, 200, 0, 0, 0, 0, 0);
		put_frame(r, c, dst, 200);
		prod = c + 16 + 208;
		break;
	case V_BAD_FLAGS:
		put_rec(r, c, 60, 0xfff0, 0, 0, 0, 0);
		put_frame(r, c, dst, 60);
		prod = c + 80;
		break;
	case V_BAD_GSO:
		put_rec(r, c, 200, 0, 0x7f, 0, 0, 0);
		put_frame(r, c, dst, 200);
		prod = c + 16 + 208;
		break;
	case V_BAD_CSUM:
		put_rec(r, c, 60, IVL_REC_CSUM_PARTIAL, 0, 0, 0xfff0, 0xfff0);
		put_frame(r, c, dst, 60);
		prod = c + 80;
		break;
	case V_RUNT:
		put_rec(r, c, 4, 0, 0, 0, 0, 0);
		prod = c + 32;
		break;
	case V_PROD_FAR:
		put_rec(r, c, 60, 0, 0, 0, 0, 0);
		put_frame(r, c, dst, 60);
		prod = c + 0x80000000U;
		break;
	case V_PROD_MISALIGNED:
		put_rec(r, c, 60, 0, 0, 0, 0, 0);
		put_frame(r, c, dst, 60);
		prod = c + 83;
		break;
	case V_PROD_BACKWARDS:
		prod = c - 4096;
		break;
	case V_NR:
		return;
	}
	wr32_release(r + CTRL_PROD, prod);
	doorbell(peer, IVL_VEC_DATA);
	actions++;
	printf("bad-record slot %u %s\n", j, vnames[v]);
	fflush(stdout);
}

/* My rings empty again (prod = cons), so a re-attach starts clean. */
static void reset_prods(void)
{
	for (uint32_t j = 0; j < max_peers; j++)
		if (j != my_slot)
			wr32_release(ring(my_slot, j) + CTRL_PROD,
				     rd32(ring(my_slot, j) + CTRL_CONS));
}

static void bad_records(unsigned int secs __maybe_unused)
{
	publish_up(my_mac);
	idle(600);
	for (int v = 0; v < V_NR; v++) {
		/* a new generation clears the victims' "broken" verdict */
		reset_prods();
		fake_rejoin();
		idle(500);
		for (uint32_t j = 0; j < max_peers; j++)
			if (victim(j))
				bad_record(j, (enum variant)v);
		idle(400);
	}
	/* the consumer side: cons of the victims' rings to me out of range */
	reset_prods();
	fake_rejoin();
	idle(500);
	for (uint32_t j = 0; j < max_peers; j++) {
		if (!victim(j))
			continue;
		wr32_release(ring(j, my_slot) + CTRL_CONS, 0x40000007U);
		doorbell(rd32(slot(j) + 4), IVL_VEC_DATA);
		actions++;
		printf("bad-cons slot %u\n", j);
	}
	idle(600);
}

static uint64_t rng_state;
static uint64_t rnd(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

static void scribble_bytes(volatile uint8_t *p, size_t n)
{
	for (size_t k = 0; k + 8 <= n; k += 8)
		wr64(p + k, rnd());
}

static void scribble(unsigned int secs)
{
	time_t end = time(NULL) + secs;

	publish_up(my_mac);
	idle(600);
	while (time(NULL) < end && !stopping) {
		for (uint32_t j = 0; j < max_peers; j++) {
			if (j == my_slot)
				continue;
			/* control blocks fully, and a random window of the data */
			scribble_bytes(ring(my_slot, j), IVL_RING_CTRL_SIZE);
			scribble_bytes(ring(j, my_slot), IVL_RING_CTRL_SIZE);
			scribble_bytes(ring(my_slot, j) + IVL_RING_CTRL_SIZE +
				       (rnd() % (ring_size / 4096)) * 4096, 4096);
			scribble_bytes(ring(j, my_slot) + IVL_RING_CTRL_SIZE +
				       (rnd() % (ring_size / 4096)) * 4096, 4096);
		}
		scribble_bytes(slot(my_slot), IVL_SLOT_SIZE);
		ring_all(rnd() & 1);
		actions++;
		idle(20);
	}
}

static void lying_dir(unsigned int secs __maybe_unused)
{
	static const uint8_t bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	volatile uint8_t *s = slot(my_slot);
	uint8_t mac[6];

	for (uint32_t j = 0; j < max_peers; j++) {
		if (!victim(j))
			continue;
		for (int k = 0; k < 6; k++)
			mac[k] = slot(j)[SLOT_OFF(mac) + k];
		fake_rejoin();
		publish_up(mac);		/* a victim's own MAC */
		printf("lying-dir victim-mac slot %u\n", j);
		actions++;
		idle(600);
		wr32(s + 4, rd32(slot(j) + 4));	/* the victim's peer ID */
		ring_all(IVL_VEC_MEMBERSHIP);
		printf("lying-dir victim-peer-id slot %u\n", j);
		actions++;
		idle(400);
		wr32(s + 4, my_pos);
	}
	fake_rejoin();
	publish_up(bcast);
	printf("lying-dir broadcast-mac\n");
	actions++;
	idle(600);
	publish_up(my_mac);
	wr32_release(s + SLOT_OFF(state), 0xdeadbeefU);
	ring_all(IVL_VEC_MEMBERSHIP);
	printf("lying-dir garbage-state\n");
	actions++;
	idle(600);
	publish_up(my_mac);
	for (int k = 0; k < 20; k++) {
		hb += 1ULL << 40;
		idle(40);
	}
	printf("lying-dir heartbeat-jumps\n");
	actions++;
	wr32(s, 7);			/* present: only the server may say */
	ring_all(IVL_VEC_MEMBERSHIP);
	printf("lying-dir bad-present\n");
	actions++;
	idle(600);
	wr32(s, 1);
	fake_rejoin();
	wr64(s + SLOT_OFF(joined_gen), rd64(s + 8) + 12345);	/* never joined */
	printf("lying-dir bad-joined-gen\n");
	actions++;
	idle(600);
}

static void sane(unsigned int secs __maybe_unused)
{
	volatile uint8_t *s = slot(my_slot);

	claiming = 0;
	half_begin(s);
	for (size_t k = SLOT_OFF(mac); k < IVL_SLOT_SIZE; k++)
		if (k < SLOT_OFF(seq) || k >= SLOT_OFF(seq) + sizeof(uint32_t))
			s[k] = 0;	/* state DOWN, everything but seq zero */
	half_end(s);
	wr32(s, 1);
	wr32(s + 4, my_pos);
	for (uint32_t j = 0; j < max_peers; j++) {
		if (j == my_slot)
			continue;
		memset((void *)ring(my_slot, j), 0, IVL_RING_CTRL_SIZE);
		memset((void *)ring(j, my_slot), 0, IVL_RING_CTRL_SIZE);
	}
	ring_all(IVL_VEC_MEMBERSHIP);
	actions++;
}

/*
 * Records from @cons up to @prod of ring @r, walked only to be counted:
 * the producer is a victim, and whatever it wrote is dropped unread.
 */
static uint64_t count_records(volatile uint8_t *r, uint32_t cons, uint32_t prod)
{
	uint64_t n = 0;

	while (prod - cons >= sizeof(struct ivl_rec_hdr) && prod - cons <= ring_size) {
		volatile uint8_t *h = r + IVL_RING_CTRL_SIZE + (cons & (ring_size - 1));
		uint32_t span = (sizeof(struct ivl_rec_hdr) + rd32(h) + IVL_REC_ALIGN - 1) &
				~(IVL_REC_ALIGN - 1);

		if (!(rd16(h + 4) & IVL_REC_PAD))
			n++;
		if (span > prod - cons || span < sizeof(struct ivl_rec_hdr))
			break;
		cons += span;
	}
	return n;
}

/*
 * Consume everything in every ring to my slot at once (cons := prod), the
 * way a peer that polls without reading looks to its producers: progress,
 * and no kicks wanted.  A producer that was more than half full gets a
 * doorbell, as the driver's consumer sends a space kick.
 */
static void consume_all(void)
{
	for (uint32_t j = 0; j < max_peers; j++) {
		volatile uint8_t *r;
		uint32_t prod, cons;

		if (!victim(j))
			continue;
		r = ring(j, my_slot);
		prod = rd32_acquire(r + CTRL_PROD);
		cons = rd32(r + CTRL_CONS);
		if (prod == cons)
			continue;
		consumed_recs += count_records(r, cons, prod);
		consumed_bytes += prod - cons;
		wr32(r + CTRL_KICK, 0);
		wr32_release(r + CTRL_CONS, prod);
		if (prod - cons > ring_size / 2)
			doorbell(rd32(slot(j) + 4), IVL_VEC_DATA);
	}
}

/* Consume every millisecond for @ms, heartbeat alive; stop at @end. */
static void consume_for(unsigned int ms, uint64_t end)
{
	static uint64_t last_beat;
	uint64_t until = now_ms() + ms;

	while (now_ms() < until && now_ms() < end && !stopping) {
		consume_all();
		/* by the clock: a 1 ms sleep may take much longer under TCG */
		if (now_ms() - last_beat >= 20) {
			beat();
			last_beat = now_ms();
		}
		sleep_ms(1);
	}
}

static void say_consumed(const char *mode)
{
	printf("ivl-hostile: %s consumed %llu records %llu bytes\n", mode,
	       (unsigned long long)consumed_recs, (unsigned long long)consumed_bytes);
}

/* UP and alive, and never a byte read: victims must go around me. */
static void deaf(unsigned int secs)
{
	publish_up(my_mac);
	say_published(my_mac);
	idle(secs * 1000);
}

static void flaky(unsigned int secs)
{
	uint64_t end = now_ms() + secs * 1000ULL;

	publish_up(my_mac);
	say_published(my_mac);
	while (now_ms() < end && !stopping) {
		consume_for(on_ms, end);
		actions++;
		if (now_ms() < end)
			idle((unsigned int)(end - now_ms() < off_ms ? end - now_ms() : off_ms));
	}
	say_consumed("flaky");
}

/* Does my guest half still say UP with @mac? */
static int still_claimed(const uint8_t *mac)
{
	volatile uint8_t *s = slot(my_slot);

	for (int k = 0; k < 6; k++)
		if (s[SLOT_OFF(mac) + k] != mac[k])
			return 0;
	return rd32(s + SLOT_OFF(state)) == IVL_STATE_UP;
}

/*
 * Another VM's MAC in my slot, a heartbeat, and every ring to me drained
 * as fast as it fills, so I look like the healthiest peer there is.  If
 * anything rewrites my half (an eviction may), claim it again.
 */

/* Consume and beat until @end; republish UP for @mac if my half changed. */
static unsigned long hold_claim(const uint8_t *mac, uint64_t end)
{
	unsigned long reclaims = 0;

	while (now_ms() < end && !stopping) {
		consume_for(20, end);
		if (!still_claimed(mac)) {
			publish_up(mac);
			reclaims++;
		}
	}
	return reclaims;
}

static void claim(unsigned int secs)
{
	uint64_t end = now_ms() + secs * 1000ULL;
	unsigned long reclaims;

	publish_up(my_mac);
	say_published(my_mac);
	actions++;
	reclaims = hold_claim(my_mac, end);
	actions += reclaims;
	say_consumed("claim");
	printf("ivl-hostile: %s reclaimed %lu\n", "claim", reclaims);
}

/*
 * bad-offload: well-formed frames whose offload metadata a strict receiver
 * (Linux 6.12's virtio_net_hdr_to_skb() and then some) must refuse.
 */
#define OFFLOAD_ROUNDS		5	/* the whole set, this many times */
#define OFFLOAD_GAP_MS		50	/* between two rounds */
#define ATTACH_MIN_MS		600	/* as bad-records gives victims */
#define ATTACH_MAX_MS		3000	/* then send to whoever is UP */
#define ROOM_WAIT_MS		200	/* for a victim to drain its ring */
#define OFFLOAD_BUF		4096	/* the largest frame, padded */
#define OFFLOAD_GSO_SIZE	1400
#define OFFLOAD_BIG		3000	/* payload bytes of the GSO kinds */
#define OFFLOAD_SMALL		64	/* and of the plain ones */
#define ETH_HDR			14
#define IP4_HDR			20
#define IP6_HDR			40
#define TCP_HDR			20
#define UDP_HDR			8

static const uint8_t src4[4] = { 10, 77, 0, 250 };
static const uint8_t src6[16] = { 0xfd, 0x77, [15] = 0xfa };	/* fd77::fa */
static uint8_t dst4[4], dst6[16];
static int have_v4, have_v6;

enum okind { K_CSUM_IN_ETH, K_GSO_V6_ON_V4, K_GSO_V4_ON_V6, K_GSO_UDP_ON_TCP,
	     K_GSO_TCP_ON_UDP, K_CSUM_BEFORE_L4, K_NR };

static const struct okind_spec {
	const char *name;
	uint8_t v6;		/* an IPv6 frame: needs -b */
	uint8_t proto;		/* 6 TCP, 17 UDP */
	uint16_t payload;	/* bytes after the L4 header */
	uint16_t gso_type, gso_size, csum_start, csum_offset;
} okinds[K_NR] = {
	[K_CSUM_IN_ETH] = { "csum-in-eth", 0, 6, OFFLOAD_SMALL,
			    IVL_GSO_NONE, 0, 4, 16 },
	[K_GSO_V6_ON_V4] = { "gso-v6-on-v4", 0, 6, OFFLOAD_BIG,
			     IVL_GSO_TCPV6, OFFLOAD_GSO_SIZE, ETH_HDR + IP4_HDR, 16 },
	[K_GSO_V4_ON_V6] = { "gso-v4-on-v6", 1, 6, OFFLOAD_BIG,
			     IVL_GSO_TCPV4, OFFLOAD_GSO_SIZE, ETH_HDR + IP6_HDR, 16 },
	[K_GSO_UDP_ON_TCP] = { "gso-udp-on-tcp", 0, 6, OFFLOAD_BIG,
			       IVL_GSO_UDP_L4, OFFLOAD_GSO_SIZE, ETH_HDR + IP4_HDR, 6 },
	[K_GSO_TCP_ON_UDP] = { "gso-tcp-on-udp", 0, 17, OFFLOAD_BIG,
			       IVL_GSO_TCPV4, OFFLOAD_GSO_SIZE, ETH_HDR + IP4_HDR, 16 },
	[K_CSUM_BEFORE_L4] = { "csum-before-l4", 0, 6, OFFLOAD_SMALL,
			       IVL_GSO_NONE, 0, ETH_HDR, 10 },
};

static int okind_enabled(int k)
{
	return !okinds[k].v6 || have_v6;
}

static void be16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static void be32(uint8_t *p, uint32_t v)
{
	be16(p, (uint16_t)(v >> 16));
	be16(p + 2, (uint16_t)v);
}

/* One's complement sum of @n bytes as big-endian 16-bit words. */
static uint32_t csum_add(uint32_t sum, const uint8_t *p, size_t n)
{
	for (size_t k = 0; k + 1 < n; k += 2)
		sum += (uint32_t)p[k] << 8 | p[k + 1];
	if (n & 1)
		sum += (uint32_t)p[n - 1] << 8;
	return sum;
}

static uint16_t csum_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)sum;
}

/*
 * Frame @k of round @round from @src to @dst into @buf (OFFLOAD_BUF bytes,
 * zero padded past the frame): Ethernet, IPv4 or IPv6, TCP or UDP, payload.
 * Returns its length.
 */
static uint32_t build_offload(int k, unsigned int round, const uint8_t *dst,
			      const uint8_t *src, uint8_t *buf)
{
	const struct okind_spec *o = &okinds[k];
	uint32_t l3 = o->v6 ? IP6_HDR : IP4_HDR;
	uint32_t l4 = (o->proto == 17 ? UDP_HDR : TCP_HDR) + o->payload;
	uint8_t *ip = buf + ETH_HDR, *th = ip + l3;
	uint32_t sum;

	memset(buf, 0, OFFLOAD_BUF);
	memcpy(buf, dst, 6);
	memcpy(buf + 6, src, 6);
	be16(buf + 12, o->v6 ? 0x86dd : 0x0800);
	if (o->v6) {
		be32(ip, 6U << 28);		/* version, class 0, flow 0 */
		be16(ip + 4, (uint16_t)l4);	/* payload length */
		ip[6] = o->proto;
		ip[7] = 64;			/* hop limit */
		memcpy(ip + 8, src6, 16);
		memcpy(ip + 24, dst6, 16);
		sum = csum_add(0, ip + 8, 32);
	} else {
		ip[0] = 0x45;
		be16(ip + 2, (uint16_t)(l3 + l4));
		be16(ip + 4, (uint16_t)(round << 8 | (unsigned int)k));	/* id */
		be16(ip + 6, 0x4000);		/* DF */
		ip[8] = 64;			/* TTL */
		ip[9] = o->proto;
		memcpy(ip + 12, src4, 4);
		memcpy(ip + 16, dst4, 4);
		be16(ip + 10, (uint16_t)~csum_fold(csum_add(0, ip, IP4_HDR)));
		sum = csum_add(0, ip + 12, 8);
	}
	be16(th, 9);				/* discard, both ways */
	be16(th + 2, 9);
	if (o->proto == 17) {
		be16(th + 4, (uint16_t)l4);
	} else {
		be32(th + 4, 0x10000000U + round * 0x10000U);	/* seq */
		be32(th + 8, 1);		/* ack */
		th[12] = 5 << 4;		/* data offset 5 words */
		th[13] = 0x10;			/* ACK */
		be16(th + 14, 64240);		/* window */
	}
	for (uint32_t i = 0; i < o->payload; i++)
		th[l4 - o->payload + i] = (uint8_t)('a' + (i + round) % 26);
	/*
	 * The pseudo-header sum, uncomplemented, in the check field: what a
	 * CHECKSUM_PARTIAL sender leaves there for the device to finish.
	 */
	sum += o->proto + (l4 >> 16) + (l4 & 0xffff);	/* both pseudo-headers */
	be16(th + (o->proto == 17 ? 6 : 16), csum_fold(sum));
	return ETH_HDR + l3 + l4;
}

static uint32_t rec_span(uint32_t len)
{
	return (uint32_t)sizeof(struct ivl_rec_hdr) +
	       ((len + IVL_REC_ALIGN - 1) & ~(IVL_REC_ALIGN - 1));
}

/*
 * Append a record (@o's metadata, @len frame bytes from @buf, zero padded
 * to IVL_REC_ALIGN there) to ring @r at my producer position *@prod, after
 * an IVL_REC_PAD record to the ring's end if it would cross it (never at
 * offset 0: there any record fits).  Nothing is published: the caller
 * stores prod, with release, after its batch.  -1: no room now, against
 * the consumer's @cons.
 */
static int append_rec(volatile uint8_t *r, uint32_t *prod, uint32_t cons,
		      const struct okind_spec *o, const uint8_t *buf, uint32_t len)
{
	uint32_t used = *prod - cons, span = rec_span(len);
	uint32_t tail = ring_size - (*prod & (ring_size - 1));
	uint32_t need = span > tail ? tail + span : span;
	volatile uint8_t *f;

	if (used > ring_size || need > ring_size - used)
		return -1;
	if (span > tail) {
		put_rec(r, *prod, tail - (uint32_t)sizeof(struct ivl_rec_hdr),
			IVL_REC_PAD, 0, 0, 0, 0);
		*prod += tail;
	}
	put_rec(r, *prod, len, IVL_REC_CSUM_PARTIAL, o->gso_type, o->gso_size,
		o->csum_start, o->csum_offset);
	f = r + IVL_RING_CTRL_SIZE + ((*prod + sizeof(struct ivl_rec_hdr)) & (ring_size - 1));
	for (uint32_t k = 0; k < span - sizeof(struct ivl_rec_hdr); k += 8) {
		uint64_t w;

		memcpy(&w, buf + k, sizeof(w));
		wr64(f + k, w);
	}
	*prod += span;
	return 0;
}

/* An UP peer's published MAC, read with the seq protocol; -1: torn. */
static int peer_mac(uint32_t j, uint8_t *mac)
{
	volatile uint8_t *s = slot(j);

	for (int tries = 0; tries < 1000; tries++) {
		uint32_t seq = rd32_acquire(s + SLOT_OFF(seq));

		if (seq & 1) {
			sleep_ms(1);
			continue;
		}
		for (int k = 0; k < 6; k++)
			mac[k] = s[SLOT_OFF(mac) + k];
		__atomic_thread_fence(__ATOMIC_ACQUIRE);	/* smp_rmb */
		if (rd32(s + SLOT_OFF(seq)) == seq)
			return 0;
	}
	return -1;
}

static int up_peer(uint32_t j)
{
	return victim(j) && rd32(slot(j) + SLOT_OFF(state)) == IVL_STATE_UP;
}

/*
 * A victim attaching its rings to me asks for kicks in the ring from me
 * (need_kick := 1, ivl_peer_attach()).  Give them ATTACH_MIN_MS, as
 * bad-records does, then wait for that flag on every UP peer's ring, at
 * most ATTACH_MAX_MS from @start, consuming and beating all along.  A
 * peer that never asked is named "ivl-hostile: @who S" on stderr, with
 * @then, what I do next.
 */
static void wait_attached(const char *who, const char *then, uint64_t start)
{
	uint32_t j;

	consume_for(ATTACH_MIN_MS, UINT64_MAX);
	while (!stopping) {
		for (j = 0; j < max_peers; j++)
			if (up_peer(j) && !rd32_acquire(ring(my_slot, j) + CTRL_KICK))
				break;
		if (j == max_peers || now_ms() - start >= ATTACH_MAX_MS)
			break;
		consume_for(20, UINT64_MAX);
	}
	for (j = 0; j < max_peers; j++)
		if (up_peer(j) && !rd32(ring(my_slot, j) + CTRL_KICK))
			fprintf(stderr, "ivl-hostile: %s %u asks for no kicks "
				"(not attached?): %s anyway\n", who, j, then);
}

/* One round of every kind to UP peer @j; sent[k] counts what went out. */
static void offload_round(uint32_t j, unsigned int round, unsigned long *sent)
{
	volatile uint8_t *r = ring(my_slot, j);
	uint32_t peer = rd32(slot(j) + 4);
	uint32_t prod = rd32(r + CTRL_PROD), cons, len;
	uint8_t dst[6], buf[OFFLOAD_BUF];
	unsigned int room_wait = ROOM_WAIT_MS;	/* once per round */

	if (peer_mac(j, dst)) {
		fprintf(stderr, "ivl-hostile: bad-offload slot %u: its MAC stays torn\n", j);
		return;
	}
	cons = rd32_acquire(r + CTRL_CONS);
	if (cons & (IVL_REC_ALIGN - 1)) {
		fprintf(stderr, "ivl-hostile: bad-offload slot %u: cons %u misaligned\n", j, cons);
		return;
	}
	/* junk an earlier run left: restart where the consumer is */
	if ((prod & (IVL_REC_ALIGN - 1)) || prod - cons > ring_size)
		prod = cons;
	for (int k = 0; k < K_NR; k++) {
		int err;

		if (!okind_enabled(k))
			continue;
		len = build_offload(k, round, dst, my_mac, buf);
		for (unsigned int t = 0;
		     (err = append_rec(r, &prod, cons, &okinds[k], buf, len)) &&
		     t < room_wait && !stopping; t += 20) {
			/* publish what is written, and let the victim drain it */
			wr32_release(r + CTRL_PROD, prod);
			doorbell(peer, IVL_VEC_DATA);
			consume_for(20, UINT64_MAX);
			cons = rd32_acquire(r + CTRL_CONS);
		}
		if (err) {
			fprintf(stderr, "ivl-hostile: bad-offload slot %u kind %s: no room in its ring\n",
				j, okinds[k].name);
			room_wait = 0;
			continue;
		}
		sent[k]++;
		actions++;
	}
	/* every record's bytes before the prod that covers them */
	wr32_release(r + CTRL_PROD, prod);
	doorbell(peer, IVL_VEC_DATA);
}

/*
 * Claim my own MAC for -t seconds, a healthy peer; once the victims have
 * attached, OFFLOAD_ROUNDS rounds of bad offload metadata to each UP peer.
 */
static void bad_offload(unsigned int secs)
{
	static unsigned long sent[IVL_MAX_PEERS][K_NR];
	static uint8_t hit[IVL_MAX_PEERS];
	uint64_t start = now_ms(), end = start + secs * 1000ULL;

	publish_up(my_mac);
	say_published(my_mac);
	if (!have_v6)
		printf("ivl-hostile: bad-offload kind %s skipped (no -b IPV6)\n",
		       okinds[K_GSO_V4_ON_V6].name);
	wait_attached("bad-offload slot", "sending", start);
	for (unsigned int round = 0; round < OFFLOAD_ROUNDS && !stopping; round++) {
		if (round)
			consume_for(OFFLOAD_GAP_MS, UINT64_MAX);
		for (uint32_t j = 0; j < max_peers; j++) {
			if (!up_peer(j))
				continue;
			hit[j] = 1;
			offload_round(j, round, sent[j]);
		}
	}
	hold_claim(my_mac, end);
	say_consumed("bad-offload");
	for (uint32_t j = 0; j < max_peers; j++)
		for (int k = 0; hit[j] && k < K_NR; k++)
			if (okind_enabled(k))
				printf("ivl-hostile: bad-offload slot %u kind %s sent %lu\n",
				       j, okinds[k].name, sent[j][k]);
}

/*
 * A writer stuck mid-update of my guest half.  UP for my own MAC, healthy
 * (heartbeat, every ring to me drained) until the victims have attached
 * and -o ON_MS more have passed; then half_begin() (seq odd, as the driver
 * starts a rewrite) and nothing after it: no field, no half_end().  The
 * heartbeat is outside the protocol and keeps moving, and so does the
 * consuming, so no stall detection fires: only my odd seq is wrong.  The
 * seq stays odd when I exit, as a peer's does that died or was evicted
 * mid-write; then the test unplugs my device, and victims must see the
 * server's half say absent whatever my half's seq says.
 */
static void stuck(unsigned int secs)
{
	volatile uint8_t *s = slot(my_slot);
	uint64_t start = now_ms(), end = start + secs * 1000ULL;

	publish_up(my_mac);
	/* not "stuck slot S": that line says I am stuck */
	wait_attached("stuck: victim slot", "going stuck", start);
	say_published(my_mac);
	/* the whole ON_MS, even past -t: the point is to end up stuck */
	consume_for(on_ms, UINT64_MAX);
	/* stopped first: seq left even, and "stuck done 0" */
	if (!stopping) {
		half_begin(s);	/* and no half_end(), ever */
		actions++;
		printf("ivl-hostile: stuck slot %u seq %u\n", my_slot, half_seq);
	}
	while (now_ms() < end && !stopping)
		consume_for(20, end);
	say_consumed("stuck");
}

/*
 * bad-offload's records for one round, written by the same code into a
 * ring in memory, walked back and printed: to check the bytes without a
 * device.  The ring starts 4 KiB before its end, so the set wraps.
 */
static void dump_offload(unsigned int secs __maybe_unused)
{
	static const uint8_t dst[6] = { 0x02, 0, 0, 0, 0, 0x01 };
	volatile uint8_t *r;
	uint8_t buf[OFFLOAD_BUF];
	uint32_t start, prod, cons, len;
	int kind[2 * K_NR], n = 0, i = 0;

	ring_size = IVL_RING_MIN_SIZE;
	r = aligned_alloc(IVL_CACHELINE, IVL_RING_CTRL_SIZE + ring_size);
	if (!r)
		die("out of memory");
	memset((void *)r, 0, IVL_RING_CTRL_SIZE + ring_size);
	start = prod = cons = ring_size - 4096;
	wr32(r + CTRL_PROD, prod);
	wr32(r + CTRL_CONS, cons);
	printf("dump-offload ring_size %u start %u src %02x:%02x:%02x:%02x:%02x:%02x "
	       "dst %02x:%02x:%02x:%02x:%02x:%02x\n", ring_size, start,
	       my_mac[0], my_mac[1], my_mac[2], my_mac[3], my_mac[4], my_mac[5],
	       dst[0], dst[1], dst[2], dst[3], dst[4], dst[5]);
	if (!have_v6)
		printf("ivl-hostile: dump-offload kind %s skipped (no -b IPV6)\n",
		       okinds[K_GSO_V4_ON_V6].name);
	for (int k = 0; k < K_NR; k++) {
		if (!okind_enabled(k))
			continue;
		len = build_offload(k, 0, dst, my_mac, buf);
		if (append_rec(r, &prod, cons, &okinds[k], buf, len))
			die("dump-offload: no room for %s", okinds[k].name);
		kind[n++] = k;
		actions++;
	}
	wr32_release(r + CTRL_PROD, prod);

	/* walk it back as a consumer would */
	prod = rd32_acquire(r + CTRL_PROD);
	for (cons = start; cons != prod && prod - cons <= ring_size;) {
		volatile uint8_t *h = r + IVL_RING_CTRL_SIZE + (cons & (ring_size - 1));
		uint16_t flags = rd16(h + 4);

		len = rd32(h);
		if (flags & IVL_REC_PAD) {
			printf("pad pos %u len %u\n", cons, len);
		} else {
			printf("record kind %s pos %u len %u flags 0x%04x gso_type %u gso_size %u "
			       "csum_start %u csum_offset %u reserved %u\nframe ",
			       i < n ? okinds[kind[i]].name : "?", cons, len, flags,
			       rd16(h + 6), rd16(h + 8), rd16(h + 10), rd16(h + 12), rd16(h + 14));
			for (uint32_t b = 0; b < len; b++)
				printf("%02x", h[sizeof(struct ivl_rec_hdr) + b]);
			putchar('\n');
			i++;
		}
		cons += rec_span(len);
	}
	printf("dump-offload prod %u\n", prod);
	free((void *)r);
}

static void usage(void)
{
	static const char text[] =
		"usage: ivl-hostile [-d PCI-ADDR] [-t SECONDS] [-m MAC] [-s SEED] [-o ON_MS] [-f OFF_MS]\n"
		"                   [-a IPV4] [-b IPV6]\n"
		"       info|up|deaf|flaky|claim|bad-records|scribble|lying-dir|sane|bad-offload|stuck\n"
		"  claim needs -m (the MAC to claim); -o/-f: flaky's consume/stop milliseconds\n"
		"  stuck: -o the milliseconds from attached to seq odd (default "
		STR(STUCK_ON_MS) "), -t the\n"
		"  seconds from start to exit (default " STR(STUCK_SECS) ", seq left odd)\n"
		"  bad-offload needs -a (the IPv4 destination of its frames), -b adds its IPv6\n"
		"  kind; dump-offload (same options) prints its records, without a device\n";

	fputs(text, stderr);
	exit(2);
}

static unsigned int parse_uint(const char *s)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 0);
	if (errno || end == s || *end || v > 24UL * 3600 * 1000)
		usage();
	return (unsigned int)v;
}

static const struct mode {
	const char *name;
	void (*run)(unsigned int secs);
} modes[] = {
	{ "info", info },
	{ "up", deaf },
	{ "deaf", deaf },
	{ "flaky", flaky },
	{ "claim", claim },
	{ "bad-records", bad_records },
	{ "scribble", scribble },
	{ "lying-dir", lying_dir },
	{ "sane", sane },
	{ "bad-offload", bad_offload },
	{ "stuck", stuck },
	{ "dump-offload", dump_offload },
	{ NULL, NULL },
};

int main(int argc, char **argv)
{
	char dev[256] = "";
	unsigned int secs = 5;
	const struct mode *m;
	int opt, have_mac = 0, have_secs = 0, have_on = 0;

	rng_state = (uint64_t)time(NULL) * 2654435761U | 1;
	while ((opt = getopt(argc, argv, "d:t:m:s:o:f:a:b:")) != -1) {
		switch (opt) {
		case 'd':
			snprintf(dev, sizeof(dev), "%s", optarg);
			break;
		case 't':
			secs = parse_uint(optarg);
			have_secs = 1;
			break;
		case 'o':
			on_ms = parse_uint(optarg);
			have_on = 1;
			break;
		case 'f':
			off_ms = parse_uint(optarg);
			break;
		case 'm':
			if (parse_mac(optarg, my_mac))
				usage();
			have_mac = 1;
			break;
		case 's':
			rng_state = strtoull(optarg, NULL, 0) | 1;
			break;
		case 'a':
			if (inet_pton(AF_INET, optarg, dst4) != 1)
				usage();
			have_v4 = 1;
			break;
		case 'b':
			if (inet_pton(AF_INET6, optarg, dst6) != 1)
				usage();
			have_v6 = 1;
			break;
		default:
			usage();
		}
	}
	if (optind != argc - 1)
		usage();
	for (m = modes; m->name && strcmp(m->name, argv[optind]); m++)
		;
	if (!m->name)
		usage();
	if (m->run == claim && !have_mac)
		usage();	/* claiming my own MAC is no attack */
	if (m->run == flaky && !on_ms)
		usage();	/* that is deaf */
	if ((m->run == bad_offload || m->run == dump_offload) && !have_v4)
		usage();	/* where the frames are for */
	if (m->run == stuck) {
		/* stuck's own defaults, not flaky's and the other modes' */
		if (!have_on)
			on_ms = STUCK_ON_MS;
		if (!have_secs)
			secs = STUCK_SECS;
	}
	if (m->run == dump_offload) {
		/* no device: any MAC will do to look at the bytes */
		if (!have_mac && eth0_mac())
			parse_mac("02:00:00:00:00:fe", my_mac);
		setvbuf(stdout, NULL, _IOLBF, 0);
		m->run(secs);
		printf("ivl-hostile: %s done %lu\n", m->name, actions);
		return 0;
	}
	if (!have_mac)
		default_mac();
	if (!dev[0])
		find_dev(dev, sizeof(dev));
	attach(dev);
	setvbuf(stdout, NULL, _IOLBF, 0);
	/* the timed modes stop early and still print their summary lines */
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);

	m->run(secs);
	printf("ivl-hostile: %s done %lu\n", m->name, actions);
	return 0;
}
