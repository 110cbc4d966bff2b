// SPDX-License-Identifier: GPL-2.0
/*
 * ivloop ring poller: polling instead of doorbells while traffic flows.
 *
 * A doorbell is an MMIO write that the peer's hypervisor turns into an
 * interrupt; without a kernel irqfd path (TCG, or a busy host) that costs
 * two host thread wake-ups, tens to hundreds of microseconds, every time
 * the consumer went idle.  After a frame crossed the shared path, more is
 * likely soon: a reply, an ACK, the next segment.  So for a while after
 * the last one, a kernel thread at the lowest priority watches the rings'
 * producer indices and runs NAPI itself, while the consumers leave their
 * kick flags off and producers ring no doorbells.
 *
 * It polls only when nothing else wants the CPU (nice 19, and it yields
 * whenever another task is runnable), and only as long as polling pays,
 * adapting the window the way KVM's halt-polling does: a frame we send
 * opens a window, each frame we receive while it is open extends it, an
 * answer that still needed a doorbell doubles it (up to rx-usecs), and a
 * window that nothing came back in halves it (down to off).  So traffic
 * that never answers, a one-way UDP flow either way, stops polling after a
 * few frames.  What it costs is host CPU time while a window is open;
 * `ethtool -C ivl0 rx-usecs 0` turns it off (the poll_us module parameter
 * is the default for new devices).
 *
 * Two flags, because an open window is not the same as someone watching.
 * IVL_F_POLL_OPEN means "a window is open: the poller should run".
 * IVL_F_POLLING means "the poller watches": NAPI completes without
 * re-arming the kicks while it is set.  The poller spins only on a CPU it
 * has to itself, but when it yields it keeps watching: the task it yields
 * to is most often the one it serves, a sender that will block soon (its
 * ACKs wait and are then taken in a batch, which a bulk stream needs to
 * be fast).  A task that does not send, a CPU hog, can however keep a
 * nice-19 thread off the CPU for tens of milliseconds, and frames left
 * unwatched that long stall the flow (TCP_RR against a guest running a
 * CPU hog was 17x slower than with plain doorbells).  So when the poller
 * comes back after IVL_POLL_STARVED_NS with no frame sent meanwhile, it
 * counts poll_starved and, for IVL_POLL_STARVED_HOLD_NS, stops watching
 * whenever it yields: NAPI re-arms the kicks and doorbells take over.
 * NAPI's MISSED state makes sure that re-arming poll happens even when
 * NAPI is running at that moment.
 *
 * Spinning pays only while the vCPU that will answer has a host core of
 * its own.  On a host with more busy vCPUs than cores it has not: our
 * spin holds the core the answer needs (two and four TCP_RR pairs on two
 * cores made 0.47x and 0.69x the transactions of doorbells alone).  The
 * guest cannot see the host's run queue, but it sees the result: a spin
 * iteration that lasted IVL_POLL_STOLEN_NS while no guest task, interrupt
 * or softirq ran here was the host running another vCPU.  Once is chance
 * (a host thread woke); twice within IVL_POLL_THEFT_GAP_NS is a host short
 * of cores, and then no window opens for IVL_POLL_STOLEN_HOLD_NS
 * (poll_stolen): the vCPU halts between frames, giving the core back.
 */
#include <linux/kernel_stat.h>
#include <linux/kthread.h>
#include <linux/sched.h>
#include <linux/sched/clock.h>
#include <linux/sched/stat.h>

#include "ivl.h"

/* A growing window starts this small; a shrinking one below it is off. */
#define IVL_POLL_MIN_NS		(10 * NSEC_PER_USEC)
/* Away this long with no frame sent meanwhile: the poller was starved ... */
#define IVL_POLL_STARVED_NS	(10 * NSEC_PER_MSEC)
/* ... so it hands over to doorbells whenever it yields, for this long. */
#define IVL_POLL_STARVED_HOLD_NS	NSEC_PER_SEC
/*
 * The watchdog looks this often; frames wait unwatched for at most
 * IVL_POLL_STARVED_NS plus one period.
 */
#define IVL_POLL_WATCHDOG_NS		(IVL_POLL_STARVED_NS / 2)
/*
 * A spin iteration this long, nothing of the guest's running meanwhile,
 * was the host's doing: longer than a host wake-up preemption, shorter
 * than a scheduler slice ...
 */
#define IVL_POLL_STOLEN_NS		NSEC_PER_MSEC
/* ... twice this close together, and polling stays off this long. */
#define IVL_POLL_THEFT_GAP_NS		(20 * NSEC_PER_MSEC)
#define IVL_POLL_STOLEN_HOLD_NS		(100 * NSEC_PER_MSEC)

/* ethtool -C ivl0 rx-usecs, read on every use */
static u64 ivl_poll_max_ns(const struct ivl_priv *priv)
{
	return (u64)READ_ONCE(priv->poll_max_us) * NSEC_PER_USEC;
}

/* The window length in force: rx-usecs may have been lowered since. */
static u64 ivl_poll_window_ns(const struct ivl_priv *priv)
{
	return min(READ_ONCE(priv->poll_ns), ivl_poll_max_ns(priv));
}

static bool ivl_poll_window_open(const struct ivl_priv *priv)
{
	return local_clock() - READ_ONCE(priv->poll_last) <
	       ivl_poll_window_ns(priv);
}

static void ivl_poll_resize(struct ivl_priv *priv, bool grow)
{
	u64 win = READ_ONCE(priv->poll_ns);

	if (grow)
		win = max_t(u64, win * 2, IVL_POLL_MIN_NS);
	else
		win = win / 2 < IVL_POLL_MIN_NS ? 0 : win / 2;
	WRITE_ONCE(priv->poll_ns, min(win, ivl_poll_max_ns(priv)));
}

/*
 * Started, never forwarded: hrtimer_start() may race with the callback
 * re-arming itself, hrtimer_forward() on a queued timer may not.
 */
static void ivl_poll_watchdog_arm(struct ivl_priv *priv)
{
	hrtimer_start(&priv->poll_watchdog, ns_to_ktime(IVL_POLL_WATCHDOG_NS),
		      HRTIMER_MODE_REL_SOFT);
}

/* Was the poller starved lately?  Then doorbells whenever it yields. */
static bool ivl_poll_starved(const struct ivl_priv *priv, u64 now)
{
	return now < READ_ONCE(priv->poll_starved);
}

/**
 * ivl_poll_tx() - we put a frame into a peer's ring
 * @priv: ivl0
 *
 * An answer may follow, so open a window unless one is open.  Only the
 * opening counts: a sender that never hears back must not keep its
 * window open by sending.
 *
 * Context: xmit, for every frame it puts into a ring.
 */
void ivl_poll_tx(struct ivl_priv *priv)
{
	u64 now = local_clock();

	WRITE_ONCE(priv->poll_tx, now);
	if (test_bit(IVL_F_POLL_OPEN, &priv->flags)) {
		/* a sender is running here: the poller is not starved */
		WRITE_ONCE(priv->poll_looked, now);
		return;
	}
	if (READ_ONCE(priv->poll_missed)) {
		/* nothing came back during the last window */
		WRITE_ONCE(priv->poll_missed, false);
		ivl_poll_resize(priv, false);
	}
	if (!ivl_poll_window_ns(priv) || now < READ_ONCE(priv->poll_stolen))
		return;
	WRITE_ONCE(priv->poll_opened, now);
	WRITE_ONCE(priv->poll_last, now);
	WRITE_ONCE(priv->poll_looked, now);
	/* the poller watches from now on: the kicks go off */
	if (!ivl_poll_starved(priv, now))
		set_bit(IVL_F_POLLING, &priv->flags);
	if (!test_and_set_bit(IVL_F_POLL_OPEN, &priv->flags)) {
		wake_up_process(priv->poller);
		ivl_poll_watchdog_arm(priv);
	}
}

/**
 * ivl_poll_rx() - NAPI took frames from the rings
 * @priv: ivl0
 *
 * While a window is open, frames keep it open only if we sent something
 * since it was last extended: an exchange goes on polling, while a peer
 * that sends one unanswered frame per window cannot keep ours open for
 * ever.  Otherwise, a frame after one of ours is an answer that had to
 * wait for a doorbell: poll longer next time.  Frames that answer nothing
 * (a one-way stream to us) never start polling.
 *
 * Context: NAPI.
 */
void ivl_poll_rx(struct ivl_priv *priv)
{
	u64 now = local_clock();

	if (test_bit(IVL_F_POLL_OPEN, &priv->flags)) {
		/* NAPI runs: frames are not waiting unwatched */
		WRITE_ONCE(priv->poll_looked, now);
		if (READ_ONCE(priv->poll_tx) >= READ_ONCE(priv->poll_last))
			WRITE_ONCE(priv->poll_last, now);
	} else if (READ_ONCE(priv->poll_tx) > READ_ONCE(priv->poll_rx)) {
		WRITE_ONCE(priv->poll_missed, false);
		ivl_poll_resize(priv, true);
	}
	WRITE_ONCE(priv->poll_rx, now);
}

/* Has any peer published a record we have not read?  A hint. */
static bool ivl_poll_pending(struct ivl_priv *priv)
{
	const struct ivl_peer_table *t;
	struct ivl_shm *shm;
	bool found = false;
	unsigned int i;

	rcu_read_lock();
	shm = ivl_shm_rcu(priv);
	t = shm ? ivl_table_rcu(shm) : NULL;
	for (i = 0; t && i < t->nr_rx && !found; i++)
		found = ivl_ring_pending(&t->rx[i]->rx);
	rcu_read_unlock();
	return found;
}

/*
 * Run NAPI here and now (softirqs run at local_bh_enable()): every peer's,
 * or @only_busy those with records waiting.
 */
static void ivl_poll_napi(struct ivl_priv *priv, bool only_busy)
{
	struct ivl_shm *shm;

	local_bh_disable();
	rcu_read_lock();
	shm = ivl_shm_rcu(priv);
	if (shm)
		ivl_napi_schedule_rx(priv, shm, only_busy);
	rcu_read_unlock();
	local_bh_enable();
}

/*
 * The poller runs at nice 19 and may be kept off the CPU by a task that
 * never sends; ivl_poll_yield() only notices once it is back.  This timer
 * bounds the wait for frames nobody watches: when the poller has not
 * looked for IVL_POLL_STARVED_NS, NAPI runs and re-arms the kicks, and
 * doorbells carry on until the poller watches again.  It sets no hold
 * of its own: under TCG a vCPU the host did not run for a while also
 * looks like a starved poller, and only the poller can tell (on its
 * return, ivl_poll_yield()).
 */
static enum hrtimer_restart ivl_poll_watchdog_fn(struct hrtimer *timer)
{
	struct ivl_priv *priv = container_of(timer, struct ivl_priv,
					     poll_watchdog);
	u64 now = local_clock();
	struct ivl_shm *shm;

	if (test_bit(IVL_F_POLLING, &priv->flags) &&
	    now - READ_ONCE(priv->poll_looked) > IVL_POLL_STARVED_NS) {
		ivl_stat_inc(priv, poll_watchdog);
		clear_bit(IVL_F_POLLING, &priv->flags);
		/* pairs with the test_bit in ivl_napi_poll() */
		smp_mb__after_atomic();
		/* soft hrtimer: BH is disabled here already */
		rcu_read_lock();
		shm = ivl_shm_rcu(priv);
		if (shm)
			ivl_napi_schedule_rx(priv, shm, false);
		rcu_read_unlock();
	}
	/* the window may have closed meanwhile: then the timer stops */
	if (test_bit(IVL_F_POLL_OPEN, &priv->flags))
		ivl_poll_watchdog_arm(priv);
	return HRTIMER_NORESTART;
}

/*
 * Start or stop watching.  Starting: NAPI runs and, seeing the flag,
 * leaves the kicks off.  Stopping: the flag is clear before NAPI looks at
 * it (pairs with its test_bit) and NAPI re-arms the kicks.
 */
static void ivl_poll_watch(struct ivl_priv *priv, bool on)
{
	if (on == test_bit(IVL_F_POLLING, &priv->flags))
		return;
	if (on) {
		set_bit(IVL_F_POLLING, &priv->flags);
	} else {
		clear_bit(IVL_F_POLLING, &priv->flags);
		/* pairs with the test_bit in ivl_napi_poll() */
		smp_mb__after_atomic();
	}
	ivl_poll_napi(priv, false);
}

/* Yield the CPU; note whether the poller was starved meanwhile. */
static void ivl_poll_yield(struct ivl_priv *priv)
{
	u64 now;

	ivl_poll_watch(priv, !ivl_poll_starved(priv, local_clock()));
	schedule();
	now = local_clock();
	if (test_bit(IVL_F_POLLING, &priv->flags) &&
	    now - READ_ONCE(priv->poll_looked) > IVL_POLL_STARVED_NS) {
		ivl_stat_inc_bh(priv, poll_starved);
		WRITE_ONCE(priv->poll_starved, now + IVL_POLL_STARVED_HOLD_NS);
	}
}

/* Where a spin iteration started: time, context switches, interrupts. */
struct ivl_poll_mark {
	u64 ns;
	unsigned long switches;
	unsigned long irqs;
};

static void ivl_poll_mark(struct ivl_poll_mark *m)
{
	m->ns = local_clock();
	m->switches = current->nvcsw + current->nivcsw;
	m->irqs = kstat_cpu_irqs_sum(raw_smp_processor_id());
}

/*
 * Did the host run another vCPU instead of this spin?  Then this window
 * ends, and after another such theft lately polling stops for a while.
 */
static bool ivl_poll_stolen(struct ivl_priv *priv,
			    const struct ivl_poll_mark *start)
{
	struct ivl_poll_mark now;

	ivl_poll_mark(&now);
	if (now.ns - start->ns < IVL_POLL_STOLEN_NS ||
	    now.switches != start->switches || now.irqs != start->irqs)
		return false;
	/* once is chance; twice lately is a host short of cores */
	if (now.ns - priv->poll_theft < IVL_POLL_THEFT_GAP_NS) {
		ivl_stat_inc_bh(priv, poll_stolen);
		WRITE_ONCE(priv->poll_stolen, now.ns + IVL_POLL_STOLEN_HOLD_NS);
	}
	priv->poll_theft = now.ns;
	return true;
}

static void ivl_poll_window(struct ivl_priv *priv)
{
	struct ivl_poll_mark mark;

	ivl_stat_inc_bh(priv, poll_windows);
	/* NAPI turns the peers' kicks off if we watch */
	if (!ivl_poll_starved(priv, local_clock()))
		set_bit(IVL_F_POLLING, &priv->flags);
	ivl_poll_napi(priv, false);
	while (ivl_poll_window_open(priv) && !kthread_should_stop()) {
		if (!single_task_running()) {
			/* only an otherwise idle CPU polls */
			ivl_poll_yield(priv);
			continue;
		}
		ivl_poll_mark(&mark);
		WRITE_ONCE(priv->poll_looked, mark.ns);
		if (!test_bit(IVL_F_POLLING, &priv->flags)) {
			ivl_poll_watch(priv, true);
		} else if (ivl_poll_pending(priv)) {
			ivl_stat_inc_bh(priv, poll_hits);
			ivl_poll_napi(priv, true);
		} else {
			cpu_relax();
			cond_resched();
			if (ivl_poll_stolen(priv, &mark))
				break;
			continue;
		}
		cond_resched();
	}
	ivl_poll_watch(priv, false);
}

static int ivl_poll_thread(void *data)
{
	struct ivl_priv *priv = data;

	while (!kthread_should_stop()) {
		set_current_state(TASK_INTERRUPTIBLE);
		if (!test_bit(IVL_F_POLL_OPEN, &priv->flags)) {
			schedule();
			continue;
		}
		__set_current_state(TASK_RUNNING);
		ivl_poll_window(priv);

		/* a window no frame came back in: the next one is shorter */
		if (READ_ONCE(priv->poll_rx) < READ_ONCE(priv->poll_opened))
			WRITE_ONCE(priv->poll_missed, true);
		clear_bit(IVL_F_POLL_OPEN, &priv->flags);
		/* flag clear before reading poll_last; ivl_poll_tx() pairs */
		smp_mb__after_atomic();
		/* a frame since the window closed: keep polling */
		if (ivl_poll_window_open(priv)) {
			set_bit(IVL_F_POLL_OPEN, &priv->flags);
			ivl_poll_watchdog_arm(priv);
		}
	}
	return 0;
}

/**
 * ivl_poll_init() - create ivl0's ring poller thread and watchdog
 * @priv: ivl0, being registered
 *
 * Context: process (ndo_init).
 * Return: 0, or the error of creating the thread.
 */
int ivl_poll_init(struct ivl_priv *priv)
{
	struct task_struct *t;

	t = kthread_create(ivl_poll_thread, priv, "ivl-poll/%s",
			   priv->dev->name);
	if (IS_ERR(t))
		return PTR_ERR(t);
	sched_set_normal(t, MAX_NICE);
	hrtimer_init(&priv->poll_watchdog, CLOCK_MONOTONIC, HRTIMER_MODE_REL_SOFT);
	priv->poll_watchdog.function = ivl_poll_watchdog_fn;
	priv->poller = t;
	wake_up_process(t);
	return 0;
}

/**
 * ivl_poll_uninit() - stop the poller thread and its watchdog
 * @priv: ivl0, being unregistered
 *
 * Context: process (ndo_uninit).
 */
void ivl_poll_uninit(struct ivl_priv *priv)
{
	if (!priv->poller)
		return;
	kthread_stop(priv->poller);
	priv->poller = NULL;
	clear_bit(IVL_F_POLL_OPEN, &priv->flags);
	hrtimer_cancel(&priv->poll_watchdog);
	clear_bit(IVL_F_POLLING, &priv->flags);
}
