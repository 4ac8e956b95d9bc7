/* Native passes of robustcaps' EM routing (see routing_body.h), built on first use by
 * robustcaps.models.native (cc -O3 -march=native -shared). */
#include <math.h>

#define NB 8
#define LOG_2PI 1.8378770664093453


#define T float
#define IDX int
#define LOGT logf
#define LOG1PT log1pf
#define EXPT expf
#define F(name) name##_f32
#include "routing_body.h"
#undef T
#undef IDX
#undef LOGT
#undef LOG1PT
#undef EXPT
#undef F

#define T double
#define IDX long long
#define LOGT log
#define LOG1PT log1p
#define EXPT exp
#define F(name) name##_f64
#include "routing_body.h"
#undef T
#undef IDX
#undef LOGT
#undef LOG1PT
#undef EXPT
#undef F
