/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * ivloop: the few kernel definitions ivl_ring.c needs, for user space.
 *
 * ivl_ring.h includes this file instead of the kernel headers when
 * __KERNEL__ is not defined, so tests/ring/ can build the very same
 * ivl_ring.c with sanitizers and a fuzzer, the way tools/virtio/ builds
 * virtio_ring.c.  Nothing here may be used by the kernel build.
 *
 * The barriers map onto the C11 memory model through GCC/Clang __atomic
 * builtins, which is at least as strong as the kernel's mapping on x86 and
 * arm64, so a barrier missing in ivl_ring.c is also missing here.
 */
#ifndef IVL_USER_H
#define IVL_USER_H

#ifdef __KERNEL__
#error "ivl_user.h is for user space builds only"
#endif

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "ivl_user.h: the byte-order helpers below assume little-endian"
#endif

/* checkpatch prefers u8 to uint8_t: these lines are what define u8 */
typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

/* Identity on little-endian hosts, checked above. */
#define le16_to_cpu(x)	((u16)(x))
#define le32_to_cpu(x)	((u32)(x))
#define le64_to_cpu(x)	((u64)(x))
#define cpu_to_le16(x)	((u16)(x))
#define cpu_to_le32(x)	((u32)(x))
#define cpu_to_le64(x)	((u64)(x))

/*
 * The fuzzer (tests/ring/ring_fuzz.c) defines IVL_USER_SHARED_HOOK to get
 * called before every access to shared memory, so it can play a peer that
 * rewrites the ring in the middle of a ring operation.  Reads that were
 * meant to happen once but happen twice then see two different values.
 */
#ifdef IVL_USER_SHARED_HOOK
void ivl_user_shared_hook(void);
#define IVL_USER_HOOK()	ivl_user_shared_hook()
#else
#define IVL_USER_HOOK()	((void)0)
#endif

/*
 * volatile is what the kernel's READ_ONCE/WRITE_ONCE use too: one access,
 * neither merged, split nor repeated by the compiler.  checkpatch's
 * "Use of volatile" warning does not apply to this definition.
 */
#define READ_ONCE(x)							\
	(IVL_USER_HOOK(), *(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, val)						\
	do {								\
		IVL_USER_HOOK();					\
		*(volatile __typeof__(x) *)&(x) = (val);		\
	} while (0)

/*
 * The ring is shared with another VM, not another CPU of this kernel: the
 * kernel spells its barriers virt_*() so they stay real barriers on a
 * CONFIG_SMP=n guest.  Same mapping here.
 */
/* acquire: later loads and stores stay after this load */
#define virt_load_acquire(p)						\
	(IVL_USER_HOOK(), __atomic_load_n((p), __ATOMIC_ACQUIRE))
/* release: earlier loads and stores stay before this store */
#define virt_store_release(p, v)						\
	do {								\
		IVL_USER_HOOK();					\
		__atomic_store_n((p), (v), __ATOMIC_RELEASE);		\
	} while (0)

/* full barrier: orders earlier stores before later loads (mfence on x86) */
#define virt_mb()	__atomic_thread_fence(__ATOMIC_SEQ_CST)
/* orders earlier loads before later loads */
#define virt_rmb()	__atomic_thread_fence(__ATOMIC_ACQUIRE)
/* orders earlier stores before later stores */
#define virt_wmb()	__atomic_thread_fence(__ATOMIC_RELEASE)

#define likely(x)	__builtin_expect(!!(x), 1)
#define unlikely(x)	__builtin_expect(!!(x), 0)

/* Like the kernel's: evaluates to the condition, reports it once. */
#define WARN_ON_ONCE(cond)						\
	({								\
		static bool __ivl_warned;				\
		bool __ivl_c = !!(cond);				\
		if (__ivl_c && !__ivl_warned) {				\
			__ivl_warned = true;				\
			fprintf(stderr, "WARNING: %s:%d: %s\n",		\
				__FILE__, __LINE__, #cond);		\
		}							\
		__ivl_c;						\
	})

static inline bool is_power_of_2(unsigned long n)
{
	return n != 0 && (n & (n - 1)) == 0;
}

#define ALIGN(x, a)							\
	({								\
		__typeof__(x) __ivl_mask = (__typeof__(x))(a) - 1;	\
		((x) + __ivl_mask) & ~__ivl_mask;			\
	})
#define IS_ALIGNED(x, a)	(((x) & ((__typeof__(x))(a) - 1)) == 0)

#endif /* IVL_USER_H */
