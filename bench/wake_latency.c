// Wake-up latency of a parked thread against a spinning one (main thread <-> one worker, round
// trips): what a threadpool pays per operator when its worker sleeps (futex, through a condition
// variable) between operators, and when it spins. bench/results/README.md quotes it.
//   gcc -O2 -pthread -o /tmp/wake bench/wake_latency.c && /tmp/wake
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>
static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t c = PTHREAD_COND_INITIALIZER, d = PTHREAD_COND_INITIALIZER;
static int go = 0, done = 0, stop = 0;
static atomic_int sgo = 0, sdone = 0;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }
static void *sleeper(void *a) {
  for (;;) {
    pthread_mutex_lock(&m);
    while (!go && !stop) pthread_cond_wait(&c, &m);
    if (stop) { pthread_mutex_unlock(&m); return 0; }
    go = 0; done = 1; pthread_cond_signal(&d); pthread_mutex_unlock(&m);
  }
}
static void *spinner(void *a) {
  for (int i = 0; i < 200000; i++) { while (atomic_load(&sgo) != i + 1) ; atomic_store(&sdone, i + 1); }
  return 0;
}
int main(void) {
  pthread_t t; pthread_create(&t, 0, sleeper, 0);
  int n = 20000; struct timespec pause = {0, 200000};  // 200 us apart: the worker is asleep
  double total = 0;
  for (int i = 0; i < n / 10; i++) {
    nanosleep(&pause, 0);
    double s = now();
    pthread_mutex_lock(&m); go = 1; pthread_cond_signal(&c);
    while (!done) pthread_cond_wait(&d, &m);
    done = 0; pthread_mutex_unlock(&m);
    total += now() - s;
  }
  printf("sleeping worker: %.1f us per wake round trip (mean of %d)\n", total / (n / 10), n / 10);
  pthread_mutex_lock(&m); stop = 1; pthread_cond_signal(&c); pthread_mutex_unlock(&m); pthread_join(t, 0);
  pthread_create(&t, 0, spinner, 0);
  double s = now();
  for (int i = 0; i < 200000; i++) { atomic_store(&sgo, i + 1); while (atomic_load(&sdone) != i + 1) ; }
  printf("spinning worker: %.2f us per round trip (mean of 200000)\n", (now() - s) / 200000);
  pthread_join(t, 0);
  return 0;
}
