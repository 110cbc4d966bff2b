// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * ivl-memcheck: does guest memory survive live migration, write for write?
 *
 *   ivl-memcheck [-m MIB] [-p PAUSE_MS]
 *
 * Sweeps MIB (default 16) MiB of locked memory until SIGTERM or SIGINT:
 * every sweep first checks that each page still holds what the previous
 * sweep stored there (the sweep number and the page's tag), then stores
 * the next sweep number.  It sleeps PAUSE_MS (default 10) between sweeps
 * so that a migration can converge.  A store the migration lost shows as
 * the number of the sweep before; anything else is a stray write.
 *
 * On the signal it prints one line and exits:
 *   ivl-memcheck: sweeps N pages P lost L stray S
 * and, before it, the first few bad pages.  Exit status: 0 every write
 * kept, 1 a write lost or strayed, 2 usage or setup failure.
 */
#define _DEFAULT_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MC_PAGE		4096
#define MC_TAG		0x69766c6d00000000ull	/* "ivlm" */
#define MC_REPORT_MAX	8

static volatile sig_atomic_t mc_stop;

static void mc_on_signal(int sig)
{
	(void)sig;
	mc_stop = 1;
}

static int mc_usage(void)
{
	fprintf(stderr, "usage: ivl-memcheck [-m MIB] [-p PAUSE_MS]\n");
	return 2;
}

int main(int argc, char **argv)
{
	unsigned long mib = 16, pause_ms = 10, lost = 0, stray = 0;
	struct sigaction sa = { .sa_handler = mc_on_signal };
	uint64_t sweep = 0;
	size_t npages, p;
	uint8_t *mem;
	char *end;
	int opt;

	while ((opt = getopt(argc, argv, "m:p:")) != -1) {
		switch (opt) {
		case 'm':
			mib = strtoul(optarg, &end, 10);
			if (*end || !mib || mib > 4096)
				return mc_usage();
			break;
		case 'p':
			pause_ms = strtoul(optarg, &end, 10);
			if (*end || pause_ms > 60000)
				return mc_usage();
			break;
		default:
			return mc_usage();
		}
	}
	if (optind != argc)
		return mc_usage();

	npages = mib * 1024 * 1024 / MC_PAGE;
	mem = mmap(NULL, npages * MC_PAGE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (mem == MAP_FAILED) {
		perror("ivl-memcheck: mmap");
		return 2;
	}
	/* resident for good: a page-out and back would be a write of its own */
	if (mlock(mem, npages * MC_PAGE))
		perror("ivl-memcheck: mlock (continuing)");
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	setvbuf(stdout, NULL, _IOLBF, 0);

	while (!mc_stop) {
		for (p = 0; p < npages; p++) {
			volatile uint64_t *w = (uint64_t *)(mem + p * MC_PAGE);
			uint64_t got = w[0], tag = w[1];

			if (sweep && (got != sweep || tag != (MC_TAG | p))) {
				int was_lost = got + 1 == sweep && tag == (MC_TAG | p);

				if (lost + stray < MC_REPORT_MAX)
					printf("ivl-memcheck: page %zu holds %llu tag %#llx, want %llu: %s\n",
					       p, (unsigned long long)got,
					       (unsigned long long)tag,
					       (unsigned long long)sweep,
					       was_lost ? "lost write" : "stray write");
				if (was_lost)
					lost++;
				else
					stray++;
			}
			w[1] = MC_TAG | p;
			w[0] = sweep + 1;
		}
		sweep++;
		if (pause_ms) {
			struct timespec ts = {
				.tv_sec = pause_ms / 1000,
				.tv_nsec = (long)(pause_ms % 1000) * 1000000,
			};

			nanosleep(&ts, NULL);
		}
	}
	printf("ivl-memcheck: sweeps %llu pages %zu lost %lu stray %lu\n",
	       (unsigned long long)sweep, npages, lost, stray);
	return lost || stray ? 1 : 0;
}
