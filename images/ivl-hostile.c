// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * ivl-hostile: a hostile (or broken) ivloop peer, for reliability tests.
 *
 * Runs in a guest whose ivshmem device has NO driver bound (boot it with
 * `driver = false` in the topology): it maps BAR0 and BAR2 through sysfs
 * (resource0, resource2) and writes whatever a misbehaving peer could.
 *
 *   ivl-hostile [-d PCI-ADDR] [-t SECONDS] [-m MAC] [-s SEED] MODE
 *
 * Modes:
 *   info         print my IVPosition, slot and the directory
 *   up           behave: publish UP with my MAC (-m, default eth0's) and a
 *                heartbeat for -t seconds (victims attach their rings)
 *   bad-records  for every present peer: fake a rejoin (bump my own slot's
 *                generation), then publish one crafted bad record (huge
 *                len, len past prod, crossing the ring end, bad flags, bad
 *                gso, bad csum, runt, prod out of range, misaligned prod),
 *                plus a bad cons in the peer's ring to me
 *   scribble     random bytes over every ring to and from my slot and
 *                over my own directory slot, for -t seconds
 *   lying-dir    my slot claims UP with a victim's MAC, the broadcast MAC,
 *                garbage state, huge heartbeat jumps, a bad present/peer_id
 *   sane         my slot DOWN, its guest line zeroed, my rings zeroed
 *
 * Every mode ends with a line "ivl-hostile: MODE done N" (N = actions).
 * Exit status: 0 ok, 1 runtime failure, 2 usage.
 */
#define _DEFAULT_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
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
#define SLOT_OFF(f)	((size_t)__builtin_offsetof(struct ivl_slot, f))

static volatile uint8_t *regs;	/* BAR0 */
static volatile uint8_t *region;	/* BAR2 */
static size_t region_len;
static uint32_t max_peers, ring_size, my_pos, my_slot = UINT32_MAX;
static uint64_t rings_off, ring_stride;
static uint8_t my_mac[6];
static int claiming;		/* bump the heartbeat while idling */
static uint64_t hb = 1000;
static unsigned long actions;

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

static uint32_t rd32(volatile uint8_t *p) { return *(volatile uint32_t *)p; }
static uint64_t rd64(volatile uint8_t *p) { return *(volatile uint64_t *)p; }
static void wr16(volatile uint8_t *p, uint16_t v) { *(volatile uint16_t *)p = v; }
static void wr32(volatile uint8_t *p, uint32_t v) { *(volatile uint32_t *)p = v; }
static void wr64(volatile uint8_t *p, uint64_t v) { *(volatile uint64_t *)p = v; }
static void wr32_release(volatile uint8_t *p, uint32_t v)
{
	__atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE);
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

	for (unsigned int t = 0; t < ms; t += 20) {
		beat();
		nanosleep(&ts, NULL);
	}
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

static void default_mac(void)
{
	char buf[32] = "";
	FILE *f = fopen("/sys/class/net/eth0/address", "r");

	if (!f || !fgets(buf, sizeof(buf), f) || parse_mac(buf, my_mac))
		die("cannot read eth0's MAC; pass -m");
	fclose(f);
}

static void put_mac(volatile uint8_t *s, const uint8_t *mac)
{
	for (int i = 0; i < 6; i++)
		s[SLOT_OFF(mac) + i] = mac[i];
}

/* Publish UP as a well-behaved driver would, for my slot's generation. */
static void publish_up(const uint8_t *mac)
{
	volatile uint8_t *s = slot(my_slot);

	put_mac(s, mac);
	wr64(s + SLOT_OFF(joined_gen), rd64(s + 8));
	wr64(s + SLOT_OFF(heartbeat), ++hb);
	wr32_release(s + SLOT_OFF(state), IVL_STATE_UP);
	claiming = 1;
	ring_all(IVL_VEC_MEMBERSHIP);
}

/* Pretend to have left and rejoined: a new slot generation, UP again. */
static void fake_rejoin(void)
{
	volatile uint8_t *s = slot(my_slot);

	wr64(s + 8, rd64(s + 8) + 1000);
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

static void info(void)
{
	printf("ivposition %u slot %u max_peers %u ring_size %u generation %llu\n",
	       my_pos, my_slot, max_peers, ring_size,
	       (unsigned long long)rd64(region + 48));
	for (uint32_t i = 0; i < max_peers; i++) {
		volatile uint8_t *s = slot(i);
		volatile uint8_t *m = s + SLOT_OFF(mac);

		printf("slot %u present %u peer_id %u gen %llu state %u mac %02x:%02x:%02x:%02x:%02x:%02x\n",
		       i, rd32(s), rd32(s + 4), (unsigned long long)rd64(s + 8),
		       rd32(s + SLOT_OFF(state)), m[0], m[1], m[2], m[3], m[4], m[5]);
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

static void bad_records(void)
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
	while (time(NULL) < end) {
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

static void lying_dir(void)
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

static void sane(void)
{
	volatile uint8_t *s = slot(my_slot);

	claiming = 0;
	wr32_release(s + SLOT_OFF(state), IVL_STATE_DOWN);
	for (size_t k = SLOT_OFF(mac); k < IVL_SLOT_SIZE; k++)
		s[k] = 0;
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

static void usage(void)
{
	fputs("usage: ivl-hostile [-d PCI-ADDR] [-t SECONDS] [-m MAC] [-s SEED] "
	      "info|up|bad-records|scribble|lying-dir|sane\n", stderr);
	exit(2);
}

int main(int argc, char **argv)
{
	char dev[256] = "";
	unsigned int secs = 5;
	const char *mode;
	int opt, have_mac = 0;

	rng_state = (uint64_t)time(NULL) * 2654435761U | 1;
	while ((opt = getopt(argc, argv, "d:t:m:s:")) != -1) {
		switch (opt) {
		case 'd': snprintf(dev, sizeof(dev), "%s", optarg); break;
		case 't': secs = (unsigned int)strtoul(optarg, NULL, 0); break;
		case 'm':
			if (parse_mac(optarg, my_mac))
				usage();
			have_mac = 1;
			break;
		case 's': rng_state = strtoull(optarg, NULL, 0) | 1; break;
		default: usage();
		}
	}
	if (optind != argc - 1)
		usage();
	mode = argv[optind];
	if (!strstr(" info up bad-records scribble lying-dir sane ", mode) ||
	    strchr(mode, ' ') || !*mode)
		usage();
	if (!have_mac)
		default_mac();
	if (!dev[0])
		find_dev(dev, sizeof(dev));
	attach(dev);
	setvbuf(stdout, NULL, _IOLBF, 0);

	if (!strcmp(mode, "info")) {
		info();
	} else if (!strcmp(mode, "up")) {
		publish_up(my_mac);
		idle(secs * 1000);
	} else if (!strcmp(mode, "bad-records")) {
		bad_records();
	} else if (!strcmp(mode, "scribble")) {
		scribble(secs);
	} else if (!strcmp(mode, "lying-dir")) {
		lying_dir();
	} else if (!strcmp(mode, "sane")) {
		sane();
	} else {
		usage();
	}
	printf("ivl-hostile: %s done %lu\n", mode, actions);
	return 0;
}
