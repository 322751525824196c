/* The round trip of one cache line between two cores: thread A on core X writes a counter,
 * thread B on core Y waits to see it and answers on the same line, N times.  Prints the mean
 * round trip in ns.  The floor under any polled ring's QD 1 latency: a request and its
 * completion each move at least one line across.
 *
 *   cc -O2 -pthread -o build/cacheline_pingpong scripts/cacheline_pingpong.c
 *   build/cacheline_pingpong 0 1 [ROUND_TRIPS]
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static _Alignas(64) volatile uint64_t line;
static long round_trips = 2000000;

static void pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (pthread_setaffinity_np(pthread_self(), sizeof(set), &set) != 0) {
        perror("pthread_setaffinity_np");
        exit(1);
    }
}

static void *answerer(void *arg)
{
    pin((int)(intptr_t)arg);
    for (uint64_t i = 1; i <= (uint64_t)round_trips; i++) {
        while (line != 2 * i - 1)
            __builtin_ia32_pause();
        line = 2 * i;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s CPU_A CPU_B [ROUND_TRIPS]\n", argv[0]);
        return 2;
    }
    if (argc > 3)
        round_trips = atol(argv[3]);
    pthread_t t;
    pthread_create(&t, NULL, answerer, (void *)(intptr_t)atoi(argv[2]));
    pin(atoi(argv[1]));
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (uint64_t i = 1; i <= (uint64_t)round_trips; i++) {
        line = 2 * i - 1;
        while (line != 2 * i)
            __builtin_ia32_pause();
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    pthread_join(t, NULL);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("cache-line round trip cpu %s <-> cpu %s: %.1f ns (%ld round trips)\n",
           argv[1], argv[2], ns / round_trips, round_trips);
    return 0;
}
